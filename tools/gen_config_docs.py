"""Generate docs/config.md, the config file reference, from the config's JSON Schema.

    python tools/gen_config_docs.py            # rewrite docs/config.md
    python tools/gen_config_docs.py --check    # exit 1 when docs/config.md is out of date

Everything in the reference comes from ``resilience-proxy schema`` (pydantic's schema of
``proxy.config``): keys, types, defaults, limits, allowed values, and the models' docstrings and
field descriptions. ``NOTES`` adds one line for keys whose schema has no description yet; a
description in the schema wins over a note, and tests/test_docs.py fails on a note for a key the
schema no longer has. So a change to ``proxy/config.py`` changes this reference, and the test
says to run this script.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from proxy.loader import json_schema  # noqa: E402
from proxy.units import format_duration, format_size  # noqa: E402

OUT = REPO / "docs" / "config.md"

# One line for keys the schema does not describe yet, by YAML path ("<name>" for a map key,
# "[]" for a list item).
NOTES: dict[str, str] = {
    "version": "Format version of the file.",
    "server": "The listeners and the process.",
    "server.listen": "Data plane `host:port` (the application sends its provider calls here).",
    "server.admin_listen": "Admin plane `host:port`: `/healthz`, `/readyz`, `/metrics`, `/admin/*`.",
    "server.admin_token": "When set, `/admin/*` needs `Authorization: Bearer <token>` (the status "
                          "page `/admin/` asks for it). Use `${RP_ADMIN_TOKEN}`.",
    "server.max_request_body": "Larger request bodies are refused with 413.",
    "server.max_buffered_response": "Larger responses are streamed, never cached or validated.",
    "server.drain_timeout": "On SIGTERM, how long in-flight requests may take to finish.",
    "server.trust_request_id": "Keep a valid incoming `x-request-id`, else make one.",
    "server.clients": "Who may use the proxy; absent = anyone who can reach `listen`.",
    "server.workers": "Processes sharing the data port (SO_REUSEPORT).",
    "server.max_concurrent_requests": "Requests served at once; more are refused with 503.",
    "server.max_header_size": "Longest request line or header.",
    "server.header_read_timeout": "Time allowed to receive a request's headers.",
    "server.keepalive_timeout": "Idle client connections are closed after this; `0`: one "
                                "request per connection (answers say `connection: close`).",
    "state": "Where shared state (budgets, quotas, cache, canary, fleet rate limits) lives.",
    "state.backend": "`memory`: this process only; `redis`: shared by every replica.",
    "state.redis.url": "`redis://[:password@]host:port/db` (use `${REDIS_URL}`).",
    "state.redis.prefix": "Prefix of every key the proxy writes.",
    "state.redis.timeout": "Longest a request waits on Redis; then the feature's failure mode applies.",
    "providers": "Upstreams by name; a request can only ever reach one of these origins.",
    "providers.<name>.url": "`scheme://host[:port][/base/path]`, or `mock://` for the bundled mock.",
    "providers.<name>.headers": "Added to every upstream request (key injection); replace the "
                                "client's same-named headers. Values are secrets: use `${VAR}`.",
    "providers.<name>.format": "How model and token usage are read from replies.",
    "providers.<name>.max_connections": "Connection pool size to this provider.",
    "providers.<name>.rate_limit": "Client-side throttle before the provider's own 429.",
    "providers.<name>.circuit_breaker": "Skip this provider's tiers while it keeps failing.",
    "providers.<name>.pricing": "USD per 1M tokens by model; `\"*\"` is the default price.",
    "providers.<name>.cost_per_request": "USD per call, for providers without token usage.",
    "budgets": "Spend caps and quotas by name; routes list the ones they count toward.",
    "budgets.<name>.window": "Calendar window, in `timezone`.",
    "budgets.<name>.per": "`global`, or `header:<name>` for one budget per header value.",
    "budgets.<name>.thresholds": "Steps by fraction of the limit: `alert`, `downgrade` (skip "
                                 "`expensive` tiers), `block`.",
    "budgets.<name>.on_state_error": "What to do when the shared state cannot be reached.",
    "defaults": "Route policy blocks every route inherits (a route's own block wins, merged key by key).",
    "routes": "Matched in order; the first whose `match` fits serves the request.",
    "routes[].name": "Used in metrics, logs, headers and `/admin` paths.",
    "routes[].tiers": "Ordered: tier 1 first, the next on failure or rejection. "
                      "`provider: <name>` is shorthand for one tier.",
    "routes[].tiers[].model": "Rewrites the JSON body's `model`; absent = unchanged.",
    "routes[].tiers[].path": "Upstream path for this tier instead of the request's.",
    "routes[].tiers[].expensive": "Skipped while a budget is at `downgrade`.",
    "routes[].timeout": "Every timer is cut to what is left of `total`; expiry of `total` answers 504.",
    "routes[].timeout.attempt": "One upstream try (a stream: until its first chunk).",
    "routes[].timeout.total": "The whole request: retries, tiers and the stream included.",
    "routes[].timeout.first_byte": "Waiting for the response headers.",
    "routes[].timeout.idle": "Longest gap between streamed chunks.",
    "routes[].retry.attempts": "Per tier, the first try included.",
    "routes[].retry.on": "Conditions that retry: `connect_error`, `reset`, `timeout`, status codes.",
    "routes[].retry.non_idempotent": "Retry POSTs (AI APIs are safe to retry).",
    "routes[].cache.ttl": "How long a stored response is served.",
    "routes[].budgets": "Budgets (by name) this route's calls count toward.",
    "routes[].redact": "PII masked in request bodies before they leave.",
    "routes[].fallback_response": "Last resort when every tier failed (or a budget blocks).",
    "routes[].canary": "Send a stable share of keys to a variant arm, with automatic rollback.",
    "routes[].canary.weight": "Percent of keys sent to the variant.",
    "routes[].canary.hash_on": "`header:<name>` or `client_ip`: the key that picks the arm.",
}

TYPE_NAMES = {"string": "string", "integer": "integer", "number": "number", "boolean": "boolean",
              "null": "null", "object": "map", "array": "list"}


class Doc:
    def __init__(self, schema: dict[str, Any]) -> None:
        self.schema = schema
        self.defs: dict[str, Any] = schema["$defs"]
        self.documented: dict[str, str] = {}  # $def name -> the path documenting it
        self.sections: list[str] = []
        self.paths: set[str] = set()

    def ref(self, node: dict[str, Any]) -> str | None:
        if "$ref" in node:
            return str(node["$ref"]).rsplit("/", 1)[1]
        return None

    def unwrap(self, node: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """(the non-null part of an optional, whether it may be null)."""
        options = node.get("anyOf")
        if options and any(o.get("type") == "null" for o in options):
            rest = [o for o in options if o.get("type") != "null"]
            if len(rest) == 1:
                return {**{k: v for k, v in node.items() if k != "anyOf"}, **rest[0]}, True
            return {**{k: v for k, v in node.items() if k != "anyOf"}, "anyOf": rest}, True
        return node, False

    def kind(self, node: dict[str, Any]) -> str:
        node, _ = self.unwrap(node)
        desc = node.get("description", "")
        if desc.startswith("a duration"):
            return "duration"
        if desc.startswith("a size"):
            return "size"
        name = self.ref(node)
        if name:
            return "object" if "properties" in self.defs[name] else self.kind(self.defs[name])
        if "const" in node:
            return f"`{json.dumps(node['const'])}`"
        if "enum" in node:
            return " \\| ".join(f"`{v}`" for v in node["enum"])
        if "anyOf" in node:
            return " or ".join(self.kind(o) for o in node["anyOf"])
        t = node.get("type")
        if t == "array":
            item = self.kind(node.get("items", {}))
            return "list of objects" if item == "object" else f"list of {item}"
        if t == "object" and isinstance(node.get("additionalProperties"), dict):
            return f"map of {self.kind(node['additionalProperties'])}"
        if isinstance(t, list):
            return " or ".join(TYPE_NAMES.get(str(x), str(x)) for x in t)
        return TYPE_NAMES.get(str(t), "any")

    def default(self, node: dict[str, Any], kind: str) -> str:
        if "default" not in node:
            return ""
        value = node["default"]
        if value is None:
            return "absent"
        if kind == "duration" and isinstance(value, int | float):
            return f"`{format_duration(float(value))}`"
        if kind == "size" and isinstance(value, int):
            return f"`{format_size(value)}`"
        if isinstance(value, dict) and value:
            return "its keys' defaults"
        return f"`{json.dumps(value)}`"

    def limits(self, node: dict[str, Any]) -> str:
        node, _ = self.unwrap(node)
        out = []
        for key, sym in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="),
                         ("exclusiveMaximum", "<"), ("minLength", "length >="),
                         ("minItems", "items >="), ("minProperties", "entries >=")):
            if key in node:
                out.append(f"{sym} {node[key]}")
        if "pattern" in node and not node.get("description", "").startswith("a duration"):
            out.append(f"matches `{node['pattern']}`")
        return ", ".join(out)

    @staticmethod
    def markdown(text: str) -> str:
        """A docstring's RST literals as Markdown, on one line."""
        text = re.sub(r":\w+:`([^`]+)`", r"`\1`", re.sub(r"``([^`]+)``", r"`\1`", text))
        return " ".join(text.split())

    def describe(self, path: str, node: dict[str, Any]) -> str:
        node, _ = self.unwrap(node)
        desc = node.get("description", "")
        if desc.startswith(("a duration", "a size")):
            desc = ""
        if not desc and self.ref(node):
            desc = self.defs[self.ref(node) or ""].get("description", "")
        if not desc:
            desc = NOTES.get(path, "")
        return self.markdown(desc)

    def child_of(self, node: dict[str, Any]) -> tuple[str, str] | None:
        """(path suffix, $def name) when the value is an object worth its own section."""
        node, _ = self.unwrap(node)
        if "anyOf" in node:  # e.g. one condition or a list of them: the object documents both
            found = [c for c in (self.child_of(o) for o in node["anyOf"]) if c is not None]
            return min(found, key=lambda c: len(c[0])) if found else None
        name = self.ref(node)
        if name and "properties" in self.defs[name]:
            return "", name
        if node.get("type") == "array":
            name = self.ref(node.get("items", {}))
            if name and "properties" in self.defs[name]:
                return "[]", name
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            name = self.ref(extra)
            if name and "properties" in self.defs[name]:
                return ".<name>", name
        return None

    def section(self, path: str, obj: dict[str, Any], level: int) -> None:
        props: dict[str, Any] = obj.get("properties", {})
        required = set(obj.get("required", []))
        # ``oneOf: [{required: [a]}, {required: [b]}]``: exactly one of a and b is required
        either = [alt["required"][0] for alt in obj.get("oneOf", []) if len(alt.get("required", [])) == 1]
        lines = [f"{'#' * level} `{path}`" if path else f"{'#' * level} Top level", ""]
        intro = self.markdown(obj.get("description", "")) or NOTES.get(path.removesuffix("[]"), "")
        if path and path.removesuffix("[]") != path:
            intro = (intro + " " if intro else "") + "Each item of the list:"
        if intro:
            lines += [intro, ""]
        lines += ["| key | type | default | limits | what it does |", "|---|---|---|---|---|"]
        later: list[tuple[str, str]] = []
        # route blocks are documented under routes[], and defaults: points there
        owners = sorted(props, key=lambda k: k == "defaults")
        for key in owners:
            child = self.child_of(props[key])
            if child is not None and child[1] not in self.documented:
                target = (f"{path}.{key}" if path else key) + child[0]
                self.documented[child[1]] = target
                later.append((target, child[1]))
        for key, node in props.items():
            full = f"{path}.{key}" if path else key
            self.paths.add(full)
            kind = self.kind(node)
            child = self.child_of(node)
            if key in required:
                default = "**required**"
            elif key in either:
                default = "**required** (or " + " or ".join(f"`{k}`" for k in either if k != key) + ")"
            else:
                default = self.default(node, kind)
            what = self.describe(full, node)
            if child is not None:
                suffix, name = child
                target = full + suffix
                owner = self.documented[name]
                if owner != target:
                    what = (what + " " if what else "") + f"Same keys as [`{owner}`](#{anchor(owner)})."
                else:
                    what = (what + " " if what else "") + f"See [`{target}`](#{anchor(target)})."
                if "anyOf" not in self.unwrap(node)[0]:
                    kind = {"": "object", "[]": "list of objects", ".<name>": "map of objects"}[suffix]
            lines.append(f"| `{key}` | {kind} | {default} | {self.limits(node)} | {what} |")
        self.sections.append("\n".join(lines))
        for target, name in later:
            self.section(target, self.defs[name], min(level + 1, 3))


def anchor(path: str) -> str:
    return "".join(c for c in path.lower() if c.isalnum() or c in "-_ ").replace(" ", "-")


def render() -> str:
    schema = json_schema()
    doc = Doc(schema)
    doc.section("", schema, 2)
    head = [
        "# Configuration reference",
        "",
        "<!-- GENERATED by tools/gen_config_docs.py from `resilience-proxy schema`; do not edit by",
        "     hand: change proxy/config.py (or the script's NOTES) and run the script. -->",
        "",
        "The YAML file that `resilience-proxy run -c FILE` serves and `resilience-proxy check -c FILE`",
        "validates. `${VAR}` and `${VAR:-default}` are replaced from the environment before",
        "validation (a missing variable without a default is an error); unknown keys are errors.",
        "Durations are strings like `250ms`, `10s`, `5m`, `2h`, `30d`; sizes like `512KiB`, `16MiB`;",
        "fractions are numbers in [0, 1]; weights are percentages in [0, 100]. The examples in",
        "`config/examples/` show each block in use; `resilience-proxy schema` prints the JSON Schema",
        "(for editors: `# yaml-language-server: $schema=...`).",
        "",
        "In paths below, `<name>` is a key you choose (a provider or budget name) and `[]` an item",
        "of a list. Where `defaults:` and `canary.variant` hold route blocks, they have the same keys.",
        "",
        "",
    ]
    return "\n".join(head) + "\n\n".join(doc.sections) + "\n"


def schema_paths() -> set[str]:
    doc = Doc(json_schema())
    doc.section("", doc.schema, 2)
    return doc.paths | set(doc.documented.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="fail if docs/config.md is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text(encoding="utf-8") != text:
            print(f"{OUT.relative_to(REPO)} is out of date: run python tools/gen_config_docs.py",
                  file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
