"""Configuration: the `plinth.yaml` schema and its loader."""

from plinth.config.loader import ConfigError, admin_key_problem, default_config, load_config, parse_config
from plinth.config.schema import (
    DeploymentConfig,
    ModelConfig,
    PlinthConfig,
    RoutingConfig,
    ServerConfig,
    StaticKeyConfig,
    StorageConfig,
)

__all__ = [
    "ConfigError",
    "DeploymentConfig",
    "ModelConfig",
    "PlinthConfig",
    "RoutingConfig",
    "ServerConfig",
    "StaticKeyConfig",
    "StorageConfig",
    "admin_key_problem",
    "default_config",
    "load_config",
    "parse_config",
]
