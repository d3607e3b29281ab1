"""Routing: model aliases to deployments, strategies, retries, cooldowns and fallback."""

from plinth.routing.router import Attempt, Deployment, ModelRoute, Router, UnknownModel

__all__ = ["Attempt", "Deployment", "ModelRoute", "Router", "UnknownModel"]
