"""The shop example: products with stock, payments that can decline, and orders, as three
small aiohttp services (`services.py`), and the order flow that composes them through the
gateway (`handlers.py`, `routes.yaml`). `make run-shop` starts all four."""
