"""Plinth: a self-hosted generative-AI foundation. See SPEC parts in docs/architecture.md."""

__version__ = "0.1.0"
