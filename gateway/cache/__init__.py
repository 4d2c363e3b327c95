"""The response cache (CONTRACT §10): RFC 9111 decisions (policy), the shared store on
shelved-cache and SQLite (store), one upstream request per missing key (coalesce), and
dropping entries on writes and purges across workers and replicas (invalidate). The stage that
uses them is gateway/stages/cache.py. Imports only config/ and http/ (rank 2, like ratelimit/).
"""
