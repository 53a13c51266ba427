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

from proxy.config import Config, PolicyBlocks, ProviderConfig, TierConfig


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


_SENSITIVE_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSW|PASS\b|AUTH|CREDENTIAL", re.IGNORECASE)


def substitute_env(node: Any, env: dict[str, str], errors: list[str], path: str = "",
                   sensitive: set[str] | None = None) -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in every string scalar.

    A variable that is unset and has no default is an error located at the value's YAML
    path. Values of variables named like a secret (``*KEY*``, ``*TOKEN*``, ``*SECRET*``,
    ``*PASSWORD*``...) are added to ``sensitive`` so error messages can mask them.
    """
    if isinstance(node, dict):
        return {k: substitute_env(v, env, errors, _join(path, k), sensitive)
                for k, v in node.items()}
    if isinstance(node, list):
        return [substitute_env(v, env, errors, f"{path}[{i}]", sensitive)
                for i, v in enumerate(node)]
    if isinstance(node, str) and "${" in node:
        def repl(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in env:
                value = env[name]
            elif default is not None:
                value = default
            else:
                errors.append(f"{path or '<root>'}: environment variable {name} is not set")
                return ""
            if sensitive is not None and _SENSITIVE_NAME.search(name):
                sensitive.add(value)
            return value
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


def _is_union_branch(loc: tuple[Any, ...]) -> bool:
    return any(isinstance(p, str) and ("[" in p or p in _UNION_TAGS) for p in loc)


def _dedupe_union_errors(errors: list[Any]) -> Iterator[str]:
    """One line per problem: the alternatives pydantic tried for a union (``on: [teapot]``
    is neither a condition name nor a status code) are joined into one line for that path."""
    lines: dict[tuple[str, bool], list[str]] = {}
    for err in errors:
        key = (_loc_to_path(err["loc"]), _is_union_branch(err["loc"]))
        messages = lines.setdefault(key, [])
        message = _message(err)
        if message not in messages:
            messages.append(message)
    for (path, union), messages in lines.items():
        if union:
            first, *alternatives = messages
            yield f"{path}: " + first + "".join(
                f"; or: {m[:1].lower()}{m[1:]}" for m in alternatives)
        else:
            yield from (f"{path}: {m}" for m in messages)


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
    """Routes inherit ``defaults:`` blocks, deep-merged (a route's own keys win; a route's
    ``null`` turns an inherited block off). A defaults block that is itself invalid is
    reported once, at ``defaults.<block>``, and not copied into every route."""
    defaults = raw.get("defaults")
    routes = raw.get("routes")
    if not isinstance(defaults, dict) or not isinstance(routes, list):
        return raw
    try:
        PolicyBlocks.model_validate(defaults)
    except ValidationError as exc:
        bad = {e["loc"][0] for e in exc.errors() if e["loc"]}
        defaults = {k: v for k, v in defaults.items() if k not in bad}
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
    """Checks of a valid config that span sections: prices, threshold order.

    Prices: on a route with a USD budget every tier must be priced; elsewhere a tier that
    names a model on a provider with ``pricing`` must find its price (a typo is not free).

    References (unknown providers and budgets, duplicate route names) are checked on the raw
    file by :func:`_reference_errors`, so they are located as written and reported together
    with schema errors.
    """
    errors: list[str] = []
    for i, route in enumerate(cfg.routes):
        where = f"routes[{i}]"
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
                if prov is not None and (usd_budget or (prov.pricing and tier.model)):
                    errors.extend(_price_check(prov, tier, f"{where}.{arm}[{j}]"))
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
    from proxy.metering import match_price  # exact, longest prefix (dated snapshots), "*"

    if match_price(prov.pricing, tier.model) is not None:
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


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false. YAML 1.1's ``on``/``off``/``yes``/``no`` would
    turn the retry block's ``on:`` key into ``True``."""


_YamlLoader.yaml_implicit_resolvers = {
    first: [r for r in resolvers if r[0] != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def parse_config(text: str, path: str = "<string>", env: dict[str, str] | None = None) -> LoadedConfig:
    """Validate a config text. Raises :class:`ConfigError` with every located error.

    Every problem is reported at once: missing environment variables, schema errors and
    cross-references (unknown providers and budgets, duplicate route names). Secret values
    (provider header values, tokens, client keys, and any variable whose name says it is a
    key, token, secret or password) are masked in the messages.
    """
    try:
        raw = yaml.load(text, Loader=_YamlLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "<root>"
        raise ConfigError([f"{where}: invalid YAML ({getattr(exc, 'problem', exc)})"]) from None
    if not isinstance(raw, dict):
        raise ConfigError(["<root>: the file must be a YAML mapping"])
    env_errors: list[str] = []
    sensitive: set[str] = set()
    raw = substitute_env(raw, dict(os.environ) if env is None else env, env_errors,
                         sensitive=sensitive)
    sensitive |= _raw_secrets(raw)
    try:
        cfg = Config.model_validate(_apply_defaults(raw))
    except ValidationError as exc:
        # an unset variable already explains the problems at its own path
        env_paths = {e.split(": ", 1)[0] for e in env_errors}
        found = [e for e in _dedupe_union_errors(exc.errors())
                 if e.split(": ", 1)[0] not in env_paths]
        errors = env_errors + found + _reference_errors(raw)
        raise ConfigError(_mask(_unique(errors), sensitive)) from None
    errors = env_errors + _reference_errors(raw) + cross_check(cfg)
    if errors:
        raise ConfigError(_mask(errors, sensitive))
    return LoadedConfig(
        config=cfg,
        path=path,
        sha256=hashlib.sha256(text.encode()).hexdigest(),
        loaded_at=time.time(),
        secrets=_secrets(cfg),
    )


def _unique(lines: list[str]) -> list[str]:
    return list(dict.fromkeys(lines))


def _mask(lines: list[str], secrets: set[str]) -> list[str]:
    """Replace every secret value (longest first) by ``[REDACTED]`` in error messages."""
    ordered = sorted((s for s in secrets if len(s) >= 4), key=len, reverse=True)
    out = []
    for line in lines:
        for secret in ordered:
            line = line.replace(secret, "[REDACTED]")
        out.append(line)
    return out


def _raw_secrets(raw: dict[str, Any]) -> set[str]:
    """Secret values of a not-yet-validated file (for masking its error messages)."""
    found: set[str] = set()
    providers = raw.get("providers")
    if isinstance(providers, dict):
        for prov in providers.values():
            headers = prov.get("headers") if isinstance(prov, dict) else None
            if isinstance(headers, dict):
                for value in headers.values():
                    if isinstance(value, str):
                        found.add(value)
                        found.add(value.partition(" ")[2])
    server = raw.get("server")
    if isinstance(server, dict):
        if isinstance(server.get("admin_token"), str):
            found.add(server["admin_token"])
        clients = server.get("clients")
        keys = clients.get("keys") if isinstance(clients, dict) else None
        if isinstance(keys, list):
            found.update(k for k in keys if isinstance(k, str))
    return found


def _reference_errors(raw: dict[str, Any]) -> list[str]:
    """Cross-references checked on the raw file, so they are reported with schema errors:
    duplicate route names, unknown providers, unknown budgets."""
    errors: list[str] = []
    providers = _as(raw.get("providers"), dict)
    budgets = _as(raw.get("budgets"), dict)
    routes = _as(raw.get("routes"), list)
    names: set[Any] = set()
    for i, route in enumerate(routes):
        if not isinstance(route, dict):
            continue
        where = f"routes[{i}]"
        name = route.get("name")
        if isinstance(name, str):
            if name in names:
                errors.append(f"{where}.name: duplicate route name '{name}'")
            names.add(name)
        arms: list[tuple[str, Any]] = [(where, route)]
        canary = route.get("canary")
        if isinstance(canary, dict) and isinstance(canary.get("variant"), dict):
            arms.append((f"{where}.canary.variant", canary["variant"]))
        for arm_where, arm in arms:
            for loc, provider in _raw_tier_providers(arm):
                if isinstance(provider, str) and provider not in providers:
                    errors.append(f"{arm_where}.{loc}: unknown provider '{provider}'")
        listed = route.get("budgets")
        if isinstance(listed, list):
            for k, budget in enumerate(listed):
                if isinstance(budget, str) and budget not in budgets:
                    errors.append(f"{where}.budgets[{k}]: unknown budget '{budget}'")
    return errors


def _as(value: Any, kind: type[Any]) -> Any:
    return value if isinstance(value, kind) else kind()


def _raw_tier_providers(arm: dict[str, Any]) -> list[tuple[str, Any]]:
    if "provider" in arm:
        return [("provider", arm["provider"])]
    tiers = arm.get("tiers")
    if not isinstance(tiers, list):
        return []
    return [(f"tiers[{j}].provider", t.get("provider")) for j, t in enumerate(tiers)
            if isinstance(t, dict)]


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
