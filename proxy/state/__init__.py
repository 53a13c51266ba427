"""Shared state: the narrow interfaces the cache, budgets, canary and fleet rate limits use,
each with a memory implementation (one process) and a Redis one (every replica)."""
