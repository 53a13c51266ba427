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
    """Credential headers are `${VAR}` references (an empty `${VAR:-}` default at most, never a
    literal one), and without a required variable `check` fails naming it."""
    text = path.read_text()
    raw = yaml.safe_load(text)
    for name, provider in raw["providers"].items():
        for header, value in (provider.get("headers") or {}).items():
            if SECRET_HEADER.search(header):
                refs = re.findall(r"\$\{\w+(?::-([^}]*))?\}", str(value))
                assert refs and refs == [""] * len(refs), f"{name}.{header} is inlined"
    needed = required_vars(text)
    if not needed:
        assert check(path, clean_env([])).returncode == 0
        return
    done = check(path, clean_env(needed))
    assert done.returncode == 1
    for name in needed:
        assert f"environment variable {name} is not set" in done.stderr
