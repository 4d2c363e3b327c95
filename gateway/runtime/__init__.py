"""What a running process holds: its state, how a table is assembled, and reload."""
