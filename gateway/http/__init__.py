"""Request-level primitives: routing, the per-request Exchange, the pipeline's phase types,
request-body watch, proxies, and errors (the one place failures become statuses).
"""
