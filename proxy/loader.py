"""Loading the configuration file: env substitution, ``defaults:``, located errors.

Errors are reported as ``<yaml path>: <problem>`` strings, e.g.
``routes[0].retry.attempts: must be >= 1``, and every one is reported, not just the first.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from proxy.config import Config, ProviderConfig, TierConfig


class ConfigError(Exception):
    """The file is invalid; ``errors`` lists every problem as ``<yaml path>: <problem>``."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


@dataclass(frozen=True)
class LoadedConfig:
    """A validated config with what the admin plane reports about it."""

    config: Config
    path: str
    sha256: str
    loaded_at: float
    secrets: frozenset[str] = field(default_factory=frozenset)


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def substitute_env(node: Any, env: dict[str, str], errors: list[str], path: str = "") -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in every string scalar."""
    if isinstance(node, dict):
        return {k: substitute_env(v, env, errors, _join(path, k)) for k, v in node.items()}
    if isinstance(node, list):
        return [substitute_env(v, env, errors, f"{path}[{i}]") for i, v in enumerate(node)]
    if isinstance(node, str) and "${" in node:
        def repl(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            errors.append(f"{path or '<root>'}: environment variable {name} is not set")
            return ""
        return _ENV.sub(repl, node)
    return node


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


_UNION_TAGS = frozenset({"int", "str", "float", "bool", "constrained-int", "constrained-float"})


def _loc_to_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and ("[" in part or part in _UNION_TAGS):
            continue  # pydantic names the union member it tried; the YAML path does not
        else:
            out = _join(out, part)
    return out or "<root>"


def _message(err: Any) -> str:
    kind, ctx, msg = err["type"], err.get("ctx") or {}, err["msg"]
    if kind == "greater_than_equal":
        return f"must be >= {ctx['ge']}"
    if kind == "greater_than":
        return f"must be > {ctx['gt']}"
    if kind == "less_than_equal":
        return f"must be <= {ctx['le']}"
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required"
    if kind == "too_short":
        return f"must have at least {ctx.get('min_length')} item(s)"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}"
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    return msg


def _dedupe_union_errors(errors: list[Any]) -> Iterator[str]:
    seen: set[str] = set()
    for err in errors:
        line = f"{_loc_to_path(err['loc'])}: {_message(err)}"
        if line not in seen:
            seen.add(line)
            yield line


def _merge(base: Any, override: Any) -> Any:
    """Deep-merge dicts (override wins); lists and scalars are replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            out[k] = _merge(base[k], v) if k in base else v
        return out
    return override


_INHERITED = ("timeout", "retry", "cache", "budgets", "validate", "redact", "faults",
              "fallback_response")


def _apply_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    defaults = raw.get("defaults")
    routes = raw.get("routes")
    if not isinstance(defaults, dict) or not isinstance(routes, list):
        return raw
    merged = []
    for route in routes:
        if isinstance(route, dict):
            route = dict(route)
            for key in _INHERITED:
                if key in defaults:
                    route[key] = _merge(defaults[key], route[key]) if key in route else defaults[key]
        merged.append(route)
    return {**raw, "routes": merged}


def cross_check(cfg: Config) -> list[str]:
    """Checks that span sections: names that refer to other sections, prices for budgets."""
    errors: list[str] = []
    names: set[str] = set()
    for i, route in enumerate(cfg.routes):
        where = f"routes[{i}]"
        if route.name in names:
            errors.append(f"{where}.name: duplicate route name '{route.name}'")
        names.add(route.name)
        arms = [("tiers", route.tiers)]
        if route.canary is not None:
            arms.append(("canary.variant.tiers", route.canary.variant.tiers))
        usd_budget = any(
            (b := cfg.budgets.get(n)) is not None and b.limit_usd is not None
            for n in route.budgets or []
        )
        for arm, tiers in arms:
            for j, tier in enumerate(tiers):
                prov = cfg.providers.get(tier.provider)
                if prov is None:
                    errors.append(f"{where}.{arm}[{j}].provider: unknown provider '{tier.provider}'")
                elif usd_budget:
                    errors.extend(_price_check(prov, tier, f"{where}.{arm}[{j}]"))
        for k, name in enumerate(route.budgets or []):
            if name not in cfg.budgets:
                errors.append(f"{where}.budgets[{k}]: unknown budget '{name}'")
    for name, budget in cfg.budgets.items():
        ats = [t.at for t in budget.thresholds]
        if ats != sorted(ats):
            errors.append(f"budgets.{name}.thresholds: must be in increasing order of 'at'")
    return errors


def _price_check(prov: ProviderConfig, tier: TierConfig, where: str) -> list[str]:
    if prov.cost_per_request is not None:
        return []
    if not prov.pricing:
        return [f"{where}.provider: provider '{tier.provider}' has no pricing and no "
                "cost_per_request, but the route has a USD budget"]
    if "*" in prov.pricing or (tier.model is not None and tier.model in prov.pricing):
        return []
    what = f"model '{tier.model}'" if tier.model else "requests that keep their own model"
    return [f"{where}.model: provider '{tier.provider}' has no price for {what} and no '*' price"]


def _secrets(cfg: Config) -> frozenset[str]:
    found: set[str] = set()
    for prov in cfg.providers.values():
        for value in prov.headers.values():
            found.add(value)
            scheme, _, token = value.partition(" ")
            if token and scheme.lower() in ("bearer", "basic", "token"):
                found.add(token)
    if cfg.server.admin_token:
        found.add(cfg.server.admin_token)
    if cfg.server.clients is not None:
        found.update(cfg.server.clients.keys)
    m = re.match(r"rediss?://[^:@/]*:([^@/]+)@", cfg.state.redis.url)
    if m:
        found.add(m.group(1))
    return frozenset(s for s in found if len(s) >= 4)


def parse_config(text: str, path: str = "<string>", env: dict[str, str] | None = None) -> LoadedConfig:
    """Validate a config text. Raises :class:`ConfigError` with located errors."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "<root>"
        raise ConfigError([f"{where}: invalid YAML ({getattr(exc, 'problem', exc)})"]) from None
    if not isinstance(raw, dict):
        raise ConfigError(["<root>: the file must be a YAML mapping"])
    errors: list[str] = []
    raw = substitute_env(raw, dict(os.environ) if env is None else env, errors)
    if errors:
        raise ConfigError(errors)
    try:
        cfg = Config.model_validate(_apply_defaults(raw))
    except ValidationError as exc:
        raise ConfigError(list(_dedupe_union_errors(exc.errors()))) from None
    errors = cross_check(cfg)
    if errors:
        raise ConfigError(errors)
    return LoadedConfig(
        config=cfg,
        path=path,
        sha256=hashlib.sha256(text.encode()).hexdigest(),
        loaded_at=time.time(),
        secrets=_secrets(cfg),
    )


def load_config(path: str | Path, env: dict[str, str] | None = None) -> LoadedConfig:
    """Read and validate a config file. Raises :class:`ConfigError`."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"<file>: cannot read {p}: {exc.strerror}"]) from None
    return parse_config(text, str(p), env)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the config file (for editors and CI)."""
    schema = Config.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "resilience-proxy configuration"
    return schema
