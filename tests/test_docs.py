"""docs/: the config reference is generated from the schema and in sync; links resolve."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from proxy.config import Config
from proxy.config_routes import _provider_shorthand_schema
from tests.deploy_support import REPO

DOCS = REPO / "docs"
GENERATOR = REPO / "tools" / "gen_config_docs.py"
OWN_DOCS = ("config.md", "deploy.md", "runbook.md")


def generator() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("gen_config_docs", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_reference_is_in_sync_with_the_schema():
    """docs/config.md is exactly what tools/gen_config_docs.py makes from today's schema: edit
    proxy/config.py and forget to regenerate, and this fails (run the script to fix it)."""
    done = subprocess.run([sys.executable, str(GENERATOR), "--check"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def model_sections(model: type[BaseModel], path: str, out: dict[str, set[str]]) -> None:
    """YAML path -> keys, for every object of the config, walking the pydantic models."""
    out.setdefault(path, set())
    if model.model_config.get("json_schema_extra") is _provider_shorthand_schema:
        out[path].add("provider")  # input-only: `provider: p` is read as `tiers: [{provider: p}]`
    for name, info in model.model_fields.items():
        key = info.alias or name
        out[path].add(key)
        for suffix, sub in _models_in(info.annotation):
            child = (f"{path}.{key}" if path else key) + suffix
            if child not in out:
                model_sections(sub, child, out)


def _models_in(tp: Any) -> list[tuple[str, type[BaseModel]]]:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [("", tp)]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list:
        return [("[]" + s, m) for s, m in _models_in(args[0])]
    if origin is dict:
        return [(".<name>" + s, m) for s, m in _models_in(args[1])]
    return [x for a in args for x in _models_in(a)]


def documented_sections(text: str) -> dict[str, set[str]]:
    sections: dict[str, set[str]] = {}
    current = None
    for line in text.splitlines():
        heading = re.match(r"^#+ (?:`([^`]+)`|Top level)$", line)
        if heading:
            current = heading.group(1) or ""
            sections[current] = set()
        elif current is not None and (row := re.match(r"^\| `([^`]+)` \|", line)):
            sections[current].add(row.group(1))
    return sections


def test_config_reference_lists_every_key_of_the_models():
    """Read independently from the pydantic models, every config object and each of its keys has
    its place in docs/config.md (an object documented once may be referred to elsewhere)."""
    want: dict[str, set[str]] = {}
    model_sections(Config, "", want)
    have = documented_sections((DOCS / "config.md").read_text())
    by_keys = {frozenset(keys) for keys in have.values()}
    for path, keys in want.items():
        if path in have:
            assert have[path] == keys, path
        else:  # e.g. defaults.retry: same keys as routes[].retry
            assert frozenset(keys) in by_keys, path


def test_notes_describe_keys_that_exist():
    """The generator's hand-written notes name real keys (none left behind by a rename)."""
    gen = generator()
    paths = gen.schema_paths()
    assert not [p for p in gen.NOTES if p not in paths]


def anchors(markdown: str) -> set[str]:
    out = set()
    for heading in re.findall(r"^#+ (.+)$", markdown, re.M):
        text = heading.strip().lower().replace("`", "")
        out.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return out


def test_links_in_the_docs_resolve():
    """Every relative link of docs/config.md, deploy.md and runbook.md points at a file of the
    repository, and every #anchor at a heading of its target."""
    for name in OWN_DOCS:
        source = DOCS / name
        text = source.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://")):
                continue
            file_part, _, anchor = target.partition("#")
            path = (source.parent / file_part).resolve() if file_part else source
            assert path.exists(), f"{name}: {target}"
            assert path.is_relative_to(REPO), f"{name}: {target}"
            if anchor:
                assert anchor in anchors(Path(path).read_text()), f"{name}: {target}"


def test_deploy_doc_names_the_image_contract():
    """docs/deploy.md documents the image's config path, ports, environment and stop signal as
    the Dockerfile has them."""
    text = (DOCS / "deploy.md").read_text()
    dockerfile = (REPO / "Dockerfile").read_text()
    for env in [*re.findall(r"^\s+(RP_\w+)=", dockerfile, re.M), "RP_ADMIN_TOKEN"]:
        assert f"`{env}`" in text, env
    assert "/etc/resilience-proxy/config.yaml" in text and "STOPSIGNAL SIGTERM" in text
    for port in re.search(r"^EXPOSE (.+)$", dockerfile, re.M).group(1).split():  # type: ignore[union-attr]
        assert f"`{port}`" in text, port
