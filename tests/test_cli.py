"""The command line (DESIGN §1): check, schema, ``python -m proxy``, RP_CONFIG, exit codes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import orjson
import pytest
import yaml

from proxy.loader import _YamlLoader, json_schema

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ROOT / "config" / "default.yaml"


def cli(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("RP_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=60)


BROKEN = """
version: 1
server: {listen: "127.0.0.1:99999", admin_token: "${RP_ADMIN_TOKEN}"}
providers:
  openai:
    url: https://api.openai.com
    headers: {authorization: "Bearer ${OPENAI_API_KEY}"}
    circuit_breaker: {failure_rate: 1.5}
routes:
  - name: chat
    match: {path_prefix: /v1/chat/completions, methods: [POST]}
    provider: openai
    retry: {attempts: 0, on: [teapot]}
    timeout: {total: soon}
  - name: other
    match: {path_prefix: /v1/}
    tiers: [{provider: anthropic}]
"""


def test_check_default_config_prints_a_summary():
    """``check`` on the default config exits 0 with routes, providers and policies listed."""
    out = cli("check", "-c", str(DEFAULT))
    assert out.returncode == 0, out.stderr
    assert ": OK (sha256 " in out.stdout
    for needle in ("providers:", "mock: mock://", "routes:", "chat: POST /v1/chat/completions*",
                   "tiers: mock(gpt-4o-mini) -> mock_backup(gpt-4o-mini)", "retry x3"):
        assert needle in out.stdout, needle


def test_check_broken_config_lists_located_errors_without_secrets(tmp_path):
    """``check`` on a broken file exits 1 and lists every error by YAML path, no secrets."""
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN)
    secret = "sk-proj-SECRET-value-123456"
    out = cli("check", "-c", str(path), env={"OPENAI_API_KEY": secret})
    assert out.returncode == 1
    err = out.stderr
    assert f"{path}: invalid (" in err
    for line in (
        "server.listen: '127.0.0.1:99999' is not host:port",
        "server.admin_token: environment variable RP_ADMIN_TOKEN is not set",
        "providers.openai.circuit_breaker.failure_rate: must be <= 1",
        "routes[0].retry.attempts: must be >= 1",
        "routes[0].timeout.total: 'soon' is not a duration",
        "routes[1].tiers[0].provider: unknown provider 'anthropic'",
    ):
        assert line in err, line
    assert "routes[0].retry.on[0]" in err
    assert secret not in err + out.stdout


def test_check_summary_shows_no_secret_values(tmp_path):
    """A valid config's summary names header keys, never their values."""
    path = tmp_path / "ok.yaml"
    path.write_text(BROKEN.split("routes:")[0].replace("failure_rate: 1.5", "failure_rate: 0.5")
                    .replace("99999", "8080") + """routes:
  - {name: chat, match: {path_prefix: /v1/}, provider: openai}
""")
    secret, token = "sk-proj-SECRET-value-123456", "admin-token-abcdef"
    out = cli("check", "-c", str(path), env={"OPENAI_API_KEY": secret, "RP_ADMIN_TOKEN": token})
    assert out.returncode == 0, out.stderr
    assert "headers: authorization" in out.stdout and "admin token set" in out.stdout
    assert secret not in out.stdout + out.stderr and token not in out.stdout + out.stderr


def test_check_uses_rp_config(tmp_path):
    """With no ``-c``, ``RP_CONFIG`` names the file."""
    path = tmp_path / "broken.yaml"
    path.write_text("version: 1\n")
    out = cli("check", env={"RP_CONFIG": str(path)})
    assert out.returncode == 1
    assert "providers: required" in out.stderr and "routes: required" in out.stderr


def test_check_missing_file_is_an_error(tmp_path):
    """A file that cannot be read is exit 1 with a message, not a traceback."""
    out = cli("check", "-c", str(tmp_path / "nope.yaml"))
    assert out.returncode == 1 and "cannot read" in out.stderr and "Traceback" not in out.stderr


def test_check_without_config_uses_the_packaged_default(tmp_path):
    """Outside the repo (no config/default.yaml) the packaged default is used."""
    out = cli("check", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "default.yaml: OK" in out.stdout


def test_schema_prints_json_schema():
    """``schema`` prints a JSON Schema document on stdout, valid under the Draft 2020-12
    meta-schema."""
    out = cli("schema")
    assert out.returncode == 0
    schema = orjson.loads(out.stdout)
    assert schema["title"] == "resilience-proxy configuration"
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert "routes" in schema["properties"]
    jsonschema.Draft202012Validator.check_schema(schema)


SHIPPED = sorted([DEFAULT, *(ROOT / "config" / "examples").glob("*.yaml")])
_REF = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def rendered(path: Path) -> object:
    """The file as an editor or a deploy step sees it once its variables are substituted
    (``${VAR}`` with a placeholder, ``${VAR:-default}`` with its default), read with the
    proxy's YAML 1.2 booleans (so ``on:`` stays a key)."""
    text = _REF.sub(lambda m: m[2] if m[2] is not None else
                    ("http://127.0.0.1:9" if m[1].endswith("URL") else "placeholder"),
                    path.read_text())
    return yaml.load(text, Loader=_YamlLoader)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_configs_validate_against_the_printed_schema(path: Path):
    """config/default.yaml and every example validate against ``schema``'s output, so the
    schema an editor uses accepts what the proxy accepts (the ``provider:`` shorthand too)."""
    schema = orjson.loads(cli("schema").stdout)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in jsonschema.Draft202012Validator(schema).iter_errors(rendered(path))]
    assert errors == []


def test_schema_rejects_provider_and_tiers_together():
    """The shorthand's schema says exactly one of ``provider`` and ``tiers``, as the loader does."""
    schema = json_schema()
    route = {"name": "r", "match": {"path_prefix": "/"}}
    validator = jsonschema.Draft202012Validator(schema)
    doc = {"providers": {"p": {"url": "mock://"}}, "routes": [route]}
    assert not validator.is_valid(doc)
    assert validator.is_valid({**doc, "routes": [{**route, "provider": "p"}]})
    assert validator.is_valid({**doc, "routes": [{**route, "tiers": [{"provider": "p"}]}]})
    assert not validator.is_valid({**doc, "routes": [{**route, "provider": "p",
                                                      "tiers": [{"provider": "p"}]}]})


@pytest.mark.parametrize("command", [["schema"], ["check", "-c", str(DEFAULT)]])
def test_a_reader_that_stops_early_gets_no_traceback(command: list[str]):
    """``check ... | head -1``: stdout's reader is gone before the output is written; the
    command ends with status 1 and nothing on stderr (no BrokenPipeError traceback)."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has already gone: the first write fails with EPIPE
    env = {k: v for k, v in os.environ.items() if not k.startswith("RP_")}
    try:
        done = subprocess.run([sys.executable, "-m", "proxy", *command], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT, timeout=60)
    finally:
        os.close(write_end)
    assert done.returncode == 1
    assert done.stderr == ""


def test_console_script_is_the_same_program():
    """The ``resilience-proxy`` console script runs the same CLI as ``python -m proxy``."""
    exe = Path(sys.executable).with_name("resilience-proxy")
    out = subprocess.run([str(exe), "check", "-c", str(DEFAULT)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and ": OK (sha256" in out.stdout


def test_run_refuses_an_invalid_config(tmp_path):
    """``run`` with an invalid file exits 1 with located errors, without serving."""
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN)
    out = cli("run", "-c", str(path), env={"OPENAI_API_KEY": "x" * 10, "RP_ADMIN_TOKEN": "t" * 8})
    assert out.returncode == 1 and "routes[0].retry.attempts: must be >= 1" in out.stderr


def test_usage_error_exit_code():
    """An unknown subcommand is a usage error (exit 2), as argparse does."""
    assert cli("frobnicate").returncode == 2
