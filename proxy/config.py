"""The configuration file's models (DESIGN §2), validated once at load.

``extra="forbid"`` and frozen everywhere; durations and sizes are parsed from strings.
Loading (env substitution, ``defaults:``, located errors) is :mod:`proxy.loader`; compiling
into route tables and policy objects is :mod:`proxy.runtime`. Nothing here runs per request.
"""

from __future__ import annotations

import re
import zoneinfo
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from proxy.jsonpath import compile_path
from proxy.units import parse_duration, parse_size

Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    WithJsonSchema({"type": ["string", "number"], "pattern": r"^(\d+(\.\d+)?(us|ms|s|m|h|d))+$",
                    "description": "a duration: 250ms, 10s, 5m, 2h, 30d (a number is seconds)"}),
]
Size = Annotated[
    int,
    BeforeValidator(parse_size),
    WithJsonSchema({"type": ["string", "integer"],
                    "description": "a size: 512KiB, 16MiB (a number is bytes)"}),
]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Percent = Annotated[float, Field(ge=0.0, le=100.0)]
RetryCondition = Literal["connect_error", "reset", "timeout"] | Annotated[int, Field(ge=100, le=599)]
RedactKind = Literal["email", "phone", "kr_rrn", "card_number"]

_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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
            if not _HEADER_NAME.match(name):
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
        if v == "global" or (v.startswith("header:") and _HEADER_NAME.match(v[7:])):
            return v if v == "global" else "header:" + v[7:].lower()
        raise ValueError("must be 'global' or 'header:<name>'")

    @model_validator(mode="after")
    def _limits(self) -> BudgetConfig:
        if self.limit_usd is None and self.limit_requests is None:
            raise ValueError("set limit_usd, limit_requests or both")
        return self


# --------------------------------------------------------------------------- route policies


class MatchConfig(Model):
    path_prefix: str | None = None
    path: str | None = None
    methods: list[str] | None = None
    headers: dict[str, str] | None = None

    @model_validator(mode="after")
    def _one_path(self) -> MatchConfig:
        if (self.path is None) == (self.path_prefix is None):
            raise ValueError("set exactly one of path or path_prefix")
        for p in (self.path, self.path_prefix):
            if p is not None and not p.startswith("/"):
                raise ValueError(f"'{p}' must start with /")
        return self


class AcceptConfig(Model):
    """A condition on a 2xx JSON reply; failing it moves to the next tier.

    Every check that is set must hold for the value at ``json_path``: ``min``/``max``
    (inclusive, numbers only), ``equals`` (JSON equality, ``true`` is not ``1``), ``in``,
    ``exists``. ``json_path`` alone means ``exists: true``. See :mod:`policies.accept`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    json_path: str
    min: float | None = None
    max: float | None = None
    equals: Any = None
    in_: list[Any] | None = Field(default=None, alias="in")
    exists: bool | None = None

    @field_validator("json_path")
    @classmethod
    def _json_path(cls, v: str) -> str:
        compile_path(v)
        return v

    @model_validator(mode="after")
    def _coherent(self) -> AcceptConfig:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("min must be <= max")
        valued = (self.min is not None or self.max is not None or self.in_ is not None
                  or "equals" in self.model_fields_set)
        if self.exists is False and valued:
            raise ValueError("exists: false cannot be combined with min, max, equals or in")
        return self


def _one_or_many(v: Any) -> Any:
    """``accept: {...}`` is ``accept: [{...}]``: one condition or a list that must all hold."""
    return [v] if isinstance(v, dict) else v


def _one_or_many_schema(schema: dict[str, Any]) -> None:
    """Let editors accept the single-condition form too (the list form is the model's)."""
    for option in schema.get("anyOf", []):
        if option.get("type") == "array":
            schema["anyOf"].insert(0, dict(option["items"]))
            return


class TierConfig(Model):
    provider: str
    model: str | None = None
    path: str | None = None
    #: one condition or a list of conditions, all of which must hold
    accept: Annotated[list[AcceptConfig] | None, BeforeValidator(_one_or_many),
                      Field(json_schema_extra=_one_or_many_schema)] = None
    expensive: bool = False

    @field_validator("path")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        if v is not None and (not v.startswith("/") or v.startswith("//")):
            raise ValueError("must start with a single /")
        return v


class TimeoutConfig(Model):
    attempt: Duration = 30.0
    total: Duration = 120.0
    first_byte: Duration = 30.0
    idle: Duration = 60.0


class BackoffConfig(Model):
    initial: Duration = 0.2
    max: Duration = 5.0
    multiplier: float = Field(default=2.0, ge=1.0)
    jitter: Literal["full", "equal"] = "full"


class RetryAfterConfig(Model):
    respect: bool = True
    max: Duration = 20.0


class RetryBudgetConfig(Model):
    ratio: Fraction = 0.2
    min_per_second: float = Field(default=5.0, ge=0)


DEFAULT_RETRY_ON: list[RetryCondition] = ["connect_error", "reset", "timeout", 429, 500, 502, 503, 504]
#: the client's problem: never retried nor sent to another tier (see proxy.classify)
NEVER_RETRIED_STATUSES = frozenset({400, 401, 403, 404, 413, 422})


class RetryConfig(Model):
    attempts: int = Field(default=3, ge=1, le=10)
    on: list[RetryCondition] = DEFAULT_RETRY_ON
    backoff: BackoffConfig = BackoffConfig()
    retry_after: RetryAfterConfig = RetryAfterConfig()
    budget: RetryBudgetConfig = RetryBudgetConfig()
    non_idempotent: bool = True

    @field_validator("on")
    @classmethod
    def _not_client_errors(cls, v: list[RetryCondition]) -> list[RetryCondition]:
        bad = sorted(c for c in v if isinstance(c, int) and c in NEVER_RETRIED_STATUSES)
        if bad:
            raise ValueError(f"{', '.join(map(str, bad))}: the client's errors are never retried")
        return v


class CacheKeyConfig(Model):
    body: bool = True
    headers: list[str] = []
    #: top-level JSON fields, or dotted paths into nested objects ("metadata.trace_id")
    ignore_json_fields: list[str] = []

    @field_validator("headers")
    @classmethod
    def _lower(cls, v: list[str]) -> list[str]:
        return [h.lower() for h in v]

    @field_validator("ignore_json_fields")
    @classmethod
    def _paths(cls, v: list[str]) -> list[str]:
        for path in v:
            if not path or "" in path.split("."):
                raise ValueError(f"'{path}' is not a field name or a dotted path (a.b.c)")
        return v


class CacheConfig(Model):
    ttl: Duration = Field(gt=0)
    key: CacheKeyConfig = CacheKeyConfig()
    statuses: list[Annotated[int, Field(ge=100, le=599)]] = [200]
    coalesce: bool = True
    max_entry_size: Size = Field(default=2 * 1024**2, ge=1)


class ValidateConfig(Model):
    """A 2xx reply must be JSON (``json``) holding a value at every ``require`` path."""

    json_: bool = Field(default=True, alias="json")
    require: list[str] = []

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("require")
    @classmethod
    def _paths(cls, v: list[str]) -> list[str]:
        for path in v:
            compile_path(path)
        return v


class FaultAbort(Model):
    percent: Percent = 0.0
    status: int = Field(default=503, ge=400, le=599)


class FaultDelay(Model):
    percent: Percent = 0.0
    duration: Duration = 2.0


class FaultsConfig(Model):
    """Failure rehearsal (see :mod:`policies.faults`); absent = off."""

    header: str = "x-rp-fault"
    abort: FaultAbort = FaultAbort()
    delay: FaultDelay = FaultDelay()

    @field_validator("header")
    @classmethod
    def _lower(cls, v: str) -> str:
        v = v.lower()
        if not v.startswith("x-rp-") or not _HEADER_NAME.match(v):
            raise ValueError("must be a header named x-rp-... (control headers never go upstream)")
        return v


class FallbackResponse(Model):
    status: int = Field(default=200, ge=100, le=599)
    headers: dict[str, str] = {"content-type": "application/json"}
    body: Any = None


class AutoRollbackConfig(Model):
    """Roll the variant back after ``consecutive`` windows that each breach a limit with at
    least ``min_requests`` variant requests (see :mod:`policies.canary`)."""

    window: Duration = Field(default=60.0, gt=0)
    consecutive: int = Field(default=3, ge=1)
    min_requests: int = Field(default=20, ge=1)
    max_error_rate: Fraction | None = 0.01
    max_p95: Duration | None = None
    #: the variant's error rate minus stable's, in the same window
    max_error_rate_over_stable: Fraction | None = None
    #: the variant's p95 minus stable's, in the same window
    max_p95_over_stable: Duration | None = None

    @model_validator(mode="after")
    def _some_limit(self) -> AutoRollbackConfig:
        if (self.max_error_rate is None and self.max_p95 is None
                and self.max_error_rate_over_stable is None and self.max_p95_over_stable is None):
            raise ValueError("set at least one limit (max_error_rate, max_p95, ...)")
        return self


class VariantConfig(Model):
    tiers: list[TierConfig] = Field(min_length=1)
    timeout: TimeoutConfig | None = None
    retry: RetryConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return _provider_shorthand(data)


class CanaryConfig(Model):
    weight: Percent = 0.0
    hash_on: str = "header:x-user-id"
    salt: str | None = None
    variant: VariantConfig
    auto_rollback: AutoRollbackConfig | None = None
    steps: list[Percent] | None = None
    step_every: Duration | None = None

    @field_validator("hash_on")
    @classmethod
    def _hash_on(cls, v: str) -> str:
        if v == "client_ip" or (v.startswith("header:") and _HEADER_NAME.match(v[7:])):
            return v if v == "client_ip" else "header:" + v[7:].lower()
        raise ValueError("must be 'header:<name>' or 'client_ip'")

    @model_validator(mode="before")
    @classmethod
    def _ramp_start(cls, data: Any) -> Any:
        """A staged ramp without ``weight`` starts at its first step."""
        if isinstance(data, dict) and "weight" not in data and isinstance(data.get("steps"), list) \
                and data["steps"]:
            data = {**data, "weight": data["steps"][0]}
        return data

    @model_validator(mode="after")
    def _ramp(self) -> CanaryConfig:
        if self.steps is None:
            if self.step_every is not None:
                raise ValueError("step_every needs steps")
            return self
        if not self.steps or any(b <= a for a, b in zip(self.steps, self.steps[1:], strict=False)):
            raise ValueError("steps must be a non-empty, strictly increasing list of percents")
        if self.step_every is None or self.step_every <= 0:
            raise ValueError("steps need step_every (how long each step lasts at least)")
        if self.auto_rollback is None:
            raise ValueError("steps need auto_rollback: the ramp advances only while the "
                             "variant's last window is within its limits")
        return self


class PolicyBlocks(Model):
    """The route policy blocks that ``defaults:`` may hold and routes override."""

    timeout: TimeoutConfig | None = None
    retry: RetryConfig | None = None
    cache: CacheConfig | None = None
    budgets: list[str] | None = None
    validate_: ValidateConfig | None = Field(default=None, alias="validate")
    redact: list[RedactKind] | None = None
    faults: FaultsConfig | None = None
    fallback_response: FallbackResponse | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class RouteConfig(PolicyBlocks):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    match: MatchConfig
    tiers: list[TierConfig] = Field(min_length=1)
    canary: CanaryConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return _provider_shorthand(data)


def _provider_shorthand(data: Any) -> Any:
    """``provider: openai`` is ``tiers: [{provider: openai}]``."""
    if isinstance(data, dict) and "provider" in data:
        if "tiers" in data:
            raise ValueError("set either provider or tiers, not both")
        data = dict(data)
        data["tiers"] = [{"provider": data.pop("provider")}]
    return data


class Config(Model):
    version: Literal[1] = 1
    server: ServerConfig = ServerConfig()
    state: StateConfig = StateConfig()
    providers: dict[str, ProviderConfig] = Field(min_length=1)
    budgets: dict[str, BudgetConfig] = {}
    defaults: PolicyBlocks | None = None
    routes: list[RouteConfig] = Field(min_length=1)
