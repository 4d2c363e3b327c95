"""Recorders that stages and actions feed: metrics and the access log."""
