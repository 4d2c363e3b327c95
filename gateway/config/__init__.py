"""Configuration as pure data: reading routes.yaml with positions, validating it, and the frozen
model it compiles to. Imports nothing else of the gateway.
"""
