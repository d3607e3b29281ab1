"""Exact-match and semantic response caches, partitioned per team, opt-in per key or request."""

from plinth.cache.service import HEADER, CachePlan, ResponseCache, build_cache

__all__ = ["HEADER", "CachePlan", "ResponseCache", "build_cache"]
