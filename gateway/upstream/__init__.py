"""Services and their targets: sending with retries, balancing, circuit breakers, health checks."""
