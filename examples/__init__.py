"""Examples shipped with the gateway: compose handlers for the smart-home inventory (`home`)
and a small shop (`shop`: three services and the order flow that composes them).

They are installed with the wheel, so `routes.yaml` can name `examples.home:scene` from any
directory; they double as templates for handlers of your own (README, "Composing services").
"""
