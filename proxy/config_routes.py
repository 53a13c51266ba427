"""The route's models (DESIGN §2): match, tiers and the route policy blocks that
``defaults:`` may hold and routes override. Part of the config schema rooted at
:class:`proxy.config.Config`; validated once at load, nothing here runs per request.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ConfigDict, Field, field_validator, model_validator

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
        if not v.startswith("x-rp-") or not HEADER_NAME.match(v):
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


def _provider_shorthand_schema(schema: dict[str, Any]) -> None:
    """Let editors accept ``provider: <name>`` in place of ``tiers`` (see
    :func:`_provider_shorthand`): exactly one of the two."""
    schema["properties"]["provider"] = {
        "type": "string", "title": "Provider",
        "description": "shorthand for `tiers: [{provider: <name>}]` (set this or tiers)"}
    required = [r for r in schema.get("required", []) if r != "tiers"]
    if required:
        schema["required"] = required
    else:
        schema.pop("required", None)
    schema["oneOf"] = [{"required": ["tiers"]}, {"required": ["provider"]}]


class VariantConfig(Model):
    model_config = ConfigDict(extra="forbid", frozen=True,
                              json_schema_extra=_provider_shorthand_schema)

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
        if v == "client_ip" or (v.startswith("header:") and HEADER_NAME.match(v[7:])):
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
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True,
                              json_schema_extra=_provider_shorthand_schema)

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
