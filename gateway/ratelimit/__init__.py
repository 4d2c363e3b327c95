"""Rate limits (CONTRACT §9): a token bucket per route and key, in memory or on Redis.

  bucket.py      the bucket arithmetic (pure, on an injected clock) and the Decision
  keys.py        whose bucket a request draws from (ip, consumer, header:NAME) and the headers
  store.py       the RateLimitStore protocol, the guard (timeout, on_store_error), the holder
  memory.py      the per-process store: bounded, idle buckets evicted
  redisstore.py  the shared store: one Lua script, one round trip, on the server's clock

The stage that uses them is gateway/stages/ratelimit.py.
"""
