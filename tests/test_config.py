"""Config loading (DESIGN §2): strict keys, env substitution, defaults, located errors."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from proxy.cli import PACKAGED_DEFAULT
from proxy.loader import ConfigError, json_schema, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent

BASE = """
version: 1
providers:
  p1: {url: "http://127.0.0.1:9", format: openai}
routes:
  - name: chat
    match: {path_prefix: /v1/chat/completions, methods: [POST]}
    provider: p1
"""


def errors_of(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, env=env or {})
    return info.value.errors


def test_minimal_config_loads_with_safe_defaults():
    """A config with only providers and routes validates and gets finite server limits."""
    loaded = parse_config(BASE, env={})
    s = loaded.config.server
    assert s.max_request_body == 16 * 1024**2 and s.drain_timeout == 25.0
    assert s.header_read_timeout > 0 and s.max_concurrent_requests > 0
    assert loaded.sha256 == hashlib.sha256(BASE.encode()).hexdigest()
    assert loaded.config.routes[0].tiers[0].provider == "p1"


@pytest.mark.parametrize(("snippet", "where"), [
    ("server: {listen: '127.0.0.1:1', colour: red}", "server.colour: unknown key"),
    ("state: {backend: memory, redis: {urll: x}}", "state.redis.urll: unknown key"),
    ("bogus_top: 1", "bogus_top: unknown key"),
])
def test_unknown_keys_are_located_errors(snippet, where):
    """Unknown keys anywhere are errors at their YAML path (typos never pass silently)."""
    assert where in errors_of(BASE + snippet)


def test_unknown_key_inside_a_route_policy():
    """A typo inside a route's policy block is located to the route index and block."""
    text = BASE + "    timeout: {atempt: 1s}\n"
    assert errors_of(text) == ["routes[0].timeout.atempt: unknown key"]


def test_env_substitution_and_defaults():
    """${VAR} takes the environment's value; ${VAR:-default} falls back to the default."""
    text = BASE.replace('"http://127.0.0.1:9"', '"${UP_URL}"') + """
server:
  listen: ${RP_LISTEN:-127.0.0.1:7000}
  admin_listen: "${ADMIN:-127.0.0.1:7001}"
"""
    loaded = parse_config(text, env={"UP_URL": "http://10.0.0.1:81/base", "ADMIN": "0.0.0.0:1"})
    assert loaded.config.providers["p1"].url == "http://10.0.0.1:81/base"
    assert loaded.config.server.listen == "127.0.0.1:7000"
    assert loaded.config.server.admin_listen == "0.0.0.0:1"


def test_empty_default_is_allowed():
    """``${RP_ADMIN_TOKEN:-}`` with the variable unset means no token (not an error)."""
    text = BASE + "server: {admin_token: '${RP_ADMIN_TOKEN:-}'}\n"
    assert parse_config(text, env={}).config.server.admin_token is None


def test_missing_env_var_is_named_and_located():
    """An unset variable without a default is an error naming it, at its YAML path."""
    text = BASE.replace(
        "format: openai", "format: openai, headers: {authorization: 'Bearer ${OPENAI_API_KEY}'}")
    errs = errors_of(text)
    assert errs == ["providers.p1.headers.authorization: environment variable OPENAI_API_KEY is not set"]


def test_every_error_is_reported_at_once():
    """Env, schema and reference errors all come back in one load, each located."""
    text = """
version: 1
server: {listen: nope}
providers:
  p1: {url: "ftp://x", headers: {x-key: "${MISSING_KEY}"}}
routes:
  - name: a
    match: {path_prefix: /v1/}
    provider: p1
    retry: {attempts: 0}
  - name: a
    match: {path_prefix: /v2/}
    tiers: [{provider: ghost}]
    budgets: [nobody]
"""
    errs = errors_of(text)
    assert "providers.p1.headers.x-key: environment variable MISSING_KEY is not set" in errs
    assert "server.listen: 'nope' is not host:port" in errs
    assert any(e.startswith("providers.p1.url: ") for e in errs)
    assert "routes[0].retry.attempts: must be >= 1" in errs
    assert "routes[1].name: duplicate route name 'a'" in errs
    assert "routes[1].tiers[0].provider: unknown provider 'ghost'" in errs
    assert "routes[1].budgets[0]: unknown budget 'nobody'" in errs
    for e in errs:
        assert re.match(r"^[A-Za-z_][\w.\[\]-]*: ", e), e


def test_contract_example_error_text():
    """The contract's own example: ``routes[0].retry.attempts: must be >= 1``."""
    assert errors_of(BASE + "    retry: {attempts: 0}\n") == ["routes[0].retry.attempts: must be >= 1"]


@pytest.mark.parametrize(("snippet", "expected"), [
    ("    timeout: {attempt: 3 seconds}\n", "routes[0].timeout.attempt: '3 seconds' is not a duration"),
    ("    cache: {ttl: 1h, max_entry_size: 2 lots}\n",
     "routes[0].cache.max_entry_size: '2 lots' is not a size"),
    ("    canary: {weight: 150, variant: {provider: p1}}\n", "routes[0].canary.weight: must be <= 100"),
])
def test_value_errors_are_located(snippet, expected):
    """Durations, sizes and ranges are checked at load and located."""
    errs = errors_of(BASE + snippet)
    assert any(e.startswith(expected) for e in errs), errs


def test_unknown_provider_in_canary_variant():
    """References inside a canary variant are checked too."""
    errs = errors_of(BASE + "    canary: {weight: 5, variant: {provider: nope}}\n")
    assert errs == ["routes[0].canary.variant.provider: unknown provider 'nope'"]


def test_yaml_syntax_error_is_located_by_line():
    """A YAML syntax error names its line and column."""
    errs = errors_of("version: 1\nroutes: [\n  - {name: x\n")
    assert len(errs) == 1 and errs[0].startswith("line ") and "invalid YAML" in errs[0]


def test_root_must_be_a_mapping():
    """A file that is a list or a scalar is refused with a located error."""
    assert errors_of("- 1\n- 2\n") == ["<root>: the file must be a YAML mapping"]


DEFAULTS = """
version: 1
providers:
  p1: {url: "http://127.0.0.1:9"}
defaults:
  timeout: {attempt: 2s, total: 9s}
  retry: {attempts: 4, backoff: {initial: 10ms, max: 1s}}
routes:
  - name: inherits
    match: {path_prefix: /a}
    provider: p1
  - name: overrides
    match: {path_prefix: /b}
    provider: p1
    timeout: {total: 20s}
    retry: {backoff: {max: 3s}}
  - name: opts_out
    match: {path_prefix: /c}
    provider: p1
    retry: null
"""


def test_defaults_are_inherited_and_deep_merged():
    """Routes inherit ``defaults:`` blocks; a route's own keys win, key by key, at any depth."""
    routes = {r.name: r for r in parse_config(DEFAULTS, env={}).config.routes}
    a, b, c = routes["inherits"], routes["overrides"], routes["opts_out"]
    assert a.timeout is not None and (a.timeout.attempt, a.timeout.total) == (2.0, 9.0)
    assert a.retry is not None and a.retry.attempts == 4 and a.retry.backoff.initial == 0.01
    assert b.timeout is not None and (b.timeout.attempt, b.timeout.total) == (2.0, 20.0)
    assert b.retry is not None and b.retry.attempts == 4
    assert (b.retry.backoff.initial, b.retry.backoff.max) == (0.01, 3.0)
    assert c.retry is None and c.timeout is not None and c.timeout.total == 9.0


def test_invalid_defaults_are_reported_once_at_defaults():
    """A bad ``defaults:`` block is located there, not repeated in every route."""
    text = DEFAULTS.replace("attempts: 4", "attempts: 0")
    assert errors_of(text) == ["defaults.retry.attempts: must be >= 1"]


def test_secrets_never_appear_in_errors():
    """Secret values (from env or inline) are masked in every error message."""
    secret = "sk-live-0123456789abcdef"
    text = """
version: 1
server: {admin_token: "${RP_ADMIN_TOKEN}", listen: "${RP_ADMIN_TOKEN}"}
providers:
  p1:
    url: "https://api.example.com/${OPENAI_API_KEY}?"
    headers: {authorization: "Bearer ${OPENAI_API_KEY}"}
routes:
  - {name: r, match: {path_prefix: /}, provider: p1}
"""
    errs = errors_of(text, env={"OPENAI_API_KEY": secret, "RP_ADMIN_TOKEN": "adm-token-xyz"})
    joined = "\n".join(errs)
    assert errs and "providers.p1.url" in joined and "server.listen" in joined
    assert secret not in joined and "adm-token-xyz" not in joined
    assert "[REDACTED]" in joined


def test_provider_shorthand_and_tiers_conflict():
    """``provider:`` and ``tiers:`` together is an error (one or the other)."""
    text = BASE.replace("provider: p1", "provider: p1\n    tiers: [{provider: p1}]")
    errs = errors_of(text)
    assert len(errs) == 1 and errs[0].startswith("routes[0]: ") and "either provider or tiers" in errs[0]


def test_default_yaml_is_the_packaged_copy():
    """``config/default.yaml`` and the packaged ``proxy/default.yaml`` are byte-identical."""
    assert (ROOT / "config" / "default.yaml").read_bytes() == PACKAGED_DEFAULT.read_bytes()


def test_default_yaml_needs_no_redis_and_no_key():
    """The default config validates with an empty environment, on memory state and mock://."""
    loaded = load_config(ROOT / "config" / "default.yaml", env={})
    cfg = loaded.config
    assert cfg.state.backend == "memory"
    assert all(p.url.startswith("mock://") for p in cfg.providers.values())
    assert cfg.server.admin_token is None and cfg.server.clients is None


def _dummy_env(text: str) -> dict[str, str]:
    names = re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", text)  # those without a default
    env = {n: "dummy-value-for-tests" for n in names}
    for n in names:
        if "URL" in n:
            env[n] = "redis://127.0.0.1:6390/0" if "REDIS" in n else "http://127.0.0.1:9"
    return env


CONFIG_FILES = sorted((ROOT / "config").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[p.name for p in CONFIG_FILES])
def test_every_shipped_config_validates(path):
    """Every config under ``config/`` (default and examples) validates with its variables set."""
    text = path.read_text()
    load_config(path, env=_dummy_env(text))


def test_schema_is_a_json_schema_of_the_file():
    """The JSON Schema is draft 2020-12, forbids unknown keys, and every $ref resolves."""
    schema = json_schema()
    data = orjson.loads(orjson.dumps(schema))
    assert data["$schema"].endswith("/2020-12/schema")
    assert {"version", "server", "state", "providers", "budgets", "defaults", "routes"} <= set(
        data["properties"])
    assert data["additionalProperties"] is False
    defs = data.get("$defs", {})

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if ref is not None:
                assert ref.startswith("#/$defs/") and ref[len("#/$defs/"):] in defs, ref
            if node.get("type") == "object" and "properties" in node:
                assert node.get("additionalProperties") is False, node.get("title")
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(data)
    assert defs["ServerConfig"]["properties"]["drain_timeout"]["type"] == ["string", "number"]


def test_default_yaml_fits_the_schema_top_level():
    """The default file uses only keys the schema declares (editors will not flag it)."""
    raw = yaml.safe_load((ROOT / "config" / "default.yaml").read_text())
    props = json_schema()["properties"]
    assert set(raw) <= set(props)


def test_retry_on_key_is_not_a_yaml_boolean():
    """``on:`` (retry conditions) stays a key: YAML 1.1 would read it as ``True``."""
    text = BASE + "    retry: {attempts: 2, on: [503, timeout, reset]}\n    validate: {json: yes}\n"
    route = parse_config(text, env={}).config.routes[0]
    assert route.retry is not None and list(route.retry.on) == [503, "timeout", "reset"]
    assert route.validate_ is not None and route.validate_.json_ is True


def test_union_alternatives_are_one_line():
    """A value that fits no member of a union (a retry condition that is neither a name nor a
    status) is one located line naming both alternatives, not one line per member."""
    errs = errors_of(BASE + "    retry: {on: [teapot]}\n")
    assert len(errs) == 1
    assert errs[0].startswith("routes[0].retry.on[0]: must be one of 'connect_error'")
    assert "; or: " in errs[0] and "integer" in errs[0]
