"""Every shipped config (config/default.yaml and each config/examples/*.yaml, found by glob) passes
`resilience-proxy check`, keeps its secrets in the environment, and never prints them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.deploy_support import REPO

CONFIGS = sorted([REPO / "config" / "default.yaml", *(REPO / "config" / "examples").glob("*.yaml")])
SECRET_HEADER = re.compile(r"authorization|api[-_]?key|secret|token|password", re.I)


def required_vars(text: str) -> list[str]:
    """Variables the file needs from the environment (``${VAR}`` without a default)."""
    return sorted(set(re.findall(r"\$\{([A-Za-z_]\w*)\}", text)))


def credential_headers(text: str) -> list[tuple[str, str]]:
    """(provider.header, value) of every provider header that carries a credential."""
    raw = yaml.safe_load(text)
    return [(f"{name}.{header}", str(value))
            for name, provider in raw["providers"].items()
            for header, value in (provider.get("headers") or {}).items()
            if SECRET_HEADER.search(header)]


def check(path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", "check", "-c", str(path)], env=env,
                          capture_output=True, text=True, timeout=60, cwd=REPO)


def clean_env(names: list[str]) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in names and not k.startswith("RP_")}


def test_the_examples_cover_each_use_case():
    """One example per use case of the issue, plain provider fronting included."""
    names = {p.stem for p in CONFIGS}
    assert {"default", "openai", "anthropic", "gemini"} <= names
    assert len(CONFIGS) >= 8, names


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(REPO)) for p in CONFIGS])
def test_config_passes_check_with_its_secrets_from_the_environment(path: Path):
    """`check` exits 0 with the file's required variables set; the summary names every route and
    provider and shows no secret value."""
    text = path.read_text()
    needed = required_vars(text)
    secrets = {name: f"placeholder-{name.lower()}-value" for name in needed}
    if "REDIS_URL" in secrets:
        secrets["REDIS_URL"] = "redis://127.0.0.1:6379/0"
    done = check(path, {**clean_env(needed), **secrets})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{path}: OK")
    raw = yaml.safe_load(text)
    for provider in raw["providers"]:
        assert f"  {provider}: " in done.stdout, provider
    for route in raw["routes"]:
        assert f"  {route['name']}: " in done.stdout, route["name"]
    for name, value in secrets.items():
        if name != "REDIS_URL":
            assert value not in done.stdout + done.stderr, f"{name} printed by check"


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(REPO)) for p in CONFIGS])
def test_config_keeps_credentials_out_of_the_file(path: Path):
    """Credential headers are required `${VAR}` references (no default: an empty one would send
    `Bearer ` upstream when the key is missing; never a literal), and without a required
    variable `check` fails naming it."""
    text = path.read_text()
    for where, value in credential_headers(text):
        refs = re.findall(r"\$\{(\w+)(:-[^}]*)?\}", value)
        assert refs, f"{where} is inlined"
        assert all(not default for _, default in refs), f"{where} has a default: {value}"
    needed = required_vars(text)
    if not needed:
        assert check(path, clean_env([])).returncode == 0
        return
    done = check(path, clean_env(needed))
    assert done.returncode == 1
    for name in needed:
        assert f"environment variable {name} is not set" in done.stderr


KEYED = [(path, var) for path in CONFIGS
         for _, value in credential_headers(path.read_text())
         for var in re.findall(r"\$\{(\w+)", value)]


@pytest.mark.parametrize(("path", "var"), KEYED,
                         ids=[f"{p.name}:{v}" for p, v in KEYED])
def test_check_without_a_provider_key_fails_naming_it(path: Path, var: str):
    """With every other variable set, a missing provider key fails `check` (exit 1) with one
    located line naming the variable, not a traceback, so no request leaves with `Bearer `."""
    needed = required_vars(path.read_text())
    env = {**clean_env(needed), **{n: "http://127.0.0.1:9" if n.endswith("URL") else "set"
                                   for n in needed if n != var}}
    done = check(path, env)
    assert done.returncode == 1, done.stdout
    assert f"environment variable {var} is not set" in done.stderr
    assert "Traceback" not in done.stderr
