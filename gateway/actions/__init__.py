"""What answers a route: forwarding (and WebSocket pass-through); aggregate and compose later."""
