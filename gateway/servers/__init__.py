"""The aiohttp applications and connections: the public listener and the admin listener."""
