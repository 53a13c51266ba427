"""The configuration file's models (DESIGN §2), validated once at load.

``extra="forbid"`` and frozen everywhere; durations and sizes are parsed from strings.
Loading (env substitution, ``defaults:``, located errors) is :mod:`proxy.loader`; compiling
into route tables and policy objects is :mod:`proxy.runtime`. Nothing here runs per request.

This module holds the document's root and its top-level sections (server, state,
providers, budgets); the route's models live in :mod:`proxy.config_routes` and the shared
value types in :mod:`proxy.config_types`. Every config model is importable from here: it
is the one place the rest of the code names config models from.
"""

from __future__ import annotations

import re
import zoneinfo
from typing import Literal

from pydantic import Field, field_validator, model_validator

from proxy.config_routes import (
    DEFAULT_RETRY_ON,
    NEVER_RETRIED_STATUSES,
    AcceptConfig,
    AutoRollbackConfig,
    BackoffConfig,
    CacheConfig,
    CacheKeyConfig,
    CanaryConfig,
    FallbackResponse,
    FaultAbort,
    FaultDelay,
    FaultsConfig,
    MatchConfig,
    PolicyBlocks,
    RetryAfterConfig,
    RetryBudgetConfig,
    RetryConfig,
    RouteConfig,
    TierConfig,
    TimeoutConfig,
    ValidateConfig,
    VariantConfig,
)
from proxy.config_types import (
    HEADER_NAME,
    Duration,
    Fraction,
    Model,
    Percent,
    RedactKind,
    RetryCondition,
    Size,
)
from proxy.jsonpath import compile_path

__all__ = [
    "DEFAULT_RETRY_ON", "NEVER_RETRIED_STATUSES", "AcceptConfig", "AutoRollbackConfig",
    "BackoffConfig", "BudgetConfig", "CacheConfig", "CacheKeyConfig", "CanaryConfig",
    "CircuitBreakerConfig", "ClientsConfig", "Config", "Duration", "FallbackResponse",
    "FaultAbort", "FaultDelay", "FaultsConfig", "Fraction", "MatchConfig",
    "MemoryStateConfig", "Model", "Percent", "PolicyBlocks", "Price", "ProviderConfig",
    "RateLimitConfig", "RedactKind", "RedisConfig", "RetryAfterConfig", "RetryBudgetConfig",
    "RetryCondition", "RetryConfig", "RouteConfig", "ServerConfig", "Size", "StateConfig",
    "Threshold", "TierConfig", "TimeoutConfig", "UsagePaths", "ValidateConfig",
    "VariantConfig",
]


# --------------------------------------------------------------------------- server / state


class ClientsConfig(Model):
    """Who may use the proxy: requests must carry one of ``keys`` in ``header``."""

    header: str = "x-api-key"
    keys: list[str] = Field(min_length=1)

    @field_validator("keys")
    @classmethod
    def _drop_empty(cls, keys: list[str]) -> list[str]:
        kept = [k for k in keys if k]
        if not kept:
            raise ValueError("at least one non-empty key is required")
        return kept


class ServerConfig(Model):
    listen: str = "0.0.0.0:8080"
    admin_listen: str = "127.0.0.1:9901"
    admin_token: str | None = None
    max_request_body: Size = 16 * 1024**2
    max_buffered_response: Size = 32 * 1024**2
    drain_timeout: Duration = 25.0
    trust_request_id: bool = True
    clients: ClientsConfig | None = None
    workers: int = Field(default=1, ge=1, le=64)
    max_concurrent_requests: int = Field(default=1024, ge=1)
    max_header_size: Size = 8190
    header_read_timeout: Duration = 10.0
    keepalive_timeout: Duration = 75.0

    @field_validator("admin_token")
    @classmethod
    def _empty_is_none(cls, v: str | None) -> str | None:
        return v or None

    @field_validator("listen", "admin_listen")
    @classmethod
    def _host_port(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"'{v}' is not host:port")
        return v


class RedisConfig(Model):
    url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "rp:"
    timeout: Duration = 0.1
    max_connections: int = Field(default=64, ge=1)


class MemoryStateConfig(Model):
    #: bytes of cached replies one process keeps (least recently used evicted past it)
    max_size: Size = 128 * 1024**2


class StateConfig(Model):
    backend: Literal["memory", "redis"] = "memory"
    redis: RedisConfig = RedisConfig()
    memory: MemoryStateConfig = MemoryStateConfig()


# --------------------------------------------------------------------------- providers


class RateLimitConfig(Model):
    requests_per_second: float = Field(gt=0)
    burst: int | None = Field(default=None, ge=1)
    max_wait: Duration = 0.5
    adaptive: bool = False
    scope: Literal["local", "fleet"] = "local"


class CircuitBreakerConfig(Model):
    failure_rate: Fraction = 0.5
    min_requests: int = Field(default=20, ge=1)
    window: Duration = 30.0
    open_for: Duration = 15.0
    half_open_requests: int = Field(default=1, ge=1)


class Price(Model):
    """USD per 1M tokens."""

    input: float = Field(ge=0)
    output: float = Field(ge=0)


class UsagePaths(Model):
    """Where usage and model sit in a JSON reply (or SSE event), as JSONPaths like
    ``$.usage.in``; when set, they replace the ``format``'s own reading (see proxy.metering)."""

    input_tokens: str | None = None
    output_tokens: str | None = None
    model: str | None = None

    @field_validator("input_tokens", "output_tokens", "model")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        if v is not None:
            compile_path(v)
        return v


class ProviderConfig(Model):
    url: str
    headers: dict[str, str] = {}
    format: Literal["openai", "anthropic", "gemini", "generic"] = "generic"
    max_connections: int = Field(default=100, ge=1)
    rate_limit: RateLimitConfig | None = None
    circuit_breaker: CircuitBreakerConfig | None = None
    pricing: dict[str, Price] | None = None
    cost_per_request: float | None = Field(default=None, ge=0)
    usage: UsagePaths | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if v.startswith("mock://"):
            return v
        m = re.fullmatch(r"(https?)://([^/?#@\s]+)(/[^?#\s]*)?", v)
        if m is None:
            raise ValueError(f"'{v}' must be http(s)://host[:port][/base/path] or mock://")
        return v.rstrip("/")

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if not HEADER_NAME.match(name):
                raise ValueError(f"'{name}' is not a valid header name")
        return {k.lower(): val for k, val in v.items()}


# --------------------------------------------------------------------------- budgets


class Threshold(Model):
    at: Fraction
    action: Literal["alert", "downgrade", "block"]


class BudgetConfig(Model):
    window: Literal["day", "month"]
    timezone: str = "UTC"
    limit_usd: float | None = Field(default=None, gt=0)
    limit_requests: int | None = Field(default=None, ge=1)
    per: str = "global"
    thresholds: list[Threshold] = [Threshold(at=1.0, action="block")]
    on_state_error: Literal["block", "allow"] = "block"
    default_output_tokens: int = Field(default=1000, ge=0)

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            zoneinfo.ZoneInfo(v)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone '{v}'") from None
        return v

    @field_validator("per")
    @classmethod
    def _per(cls, v: str) -> str:
        if v == "global" or (v.startswith("header:") and HEADER_NAME.match(v[7:])):
            return v if v == "global" else "header:" + v[7:].lower()
        raise ValueError("must be 'global' or 'header:<name>'")

    @model_validator(mode="after")
    def _limits(self) -> BudgetConfig:
        if self.limit_usd is None and self.limit_requests is None:
            raise ValueError("set limit_usd, limit_requests or both")
        return self


class Config(Model):
    version: Literal[1] = 1
    server: ServerConfig = ServerConfig()
    state: StateConfig = StateConfig()
    providers: dict[str, ProviderConfig] = Field(min_length=1)
    budgets: dict[str, BudgetConfig] = {}
    defaults: PolicyBlocks | None = None
    routes: list[RouteConfig] = Field(min_length=1)
