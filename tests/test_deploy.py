"""The container image, compose file and Kubernetes manifests: checked field by field, and the
Dockerfile's build replayed for real in a fresh virtualenv (no Docker engine runs here)."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.loader import load_config
from proxy.units import parse_duration
from tests.conftest import free_port
from tests.deploy_support import PROM_DIR, REPO

K8S = REPO / "deploy" / "kubernetes"
SECRETISH = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|REDIS_URL", re.I)

# --------------------------------------------------------------------------- Dockerfile model


@dataclass
class Instruction:
    op: str
    args: str
    flags: dict[str, str] = field(default_factory=dict)

    def words(self) -> list[str]:
        if self.args.startswith("["):
            return list(json.loads(self.args))
        return self.args.split()


@dataclass
class Stage:
    base: str
    name: str | None
    steps: list[Instruction]

    def all(self, op: str) -> list[Instruction]:
        return [s for s in self.steps if s.op == op]

    def one(self, op: str) -> Instruction:
        [step] = self.all(op)
        return step


def parse_dockerfile(text: str) -> list[Stage]:
    """Instructions by stage; continuation lines joined, comments dropped, global ARGs applied."""
    logical, buf = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        buf += (" " if buf else "") + line.rstrip("\\").strip()
        if not line.endswith("\\"):
            logical.append(buf)
            buf = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        op, _, rest = line.partition(" ")
        op, rest = op.upper(), rest.strip()
        flags = {}
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            k, _, v = flag[2:].partition("=")
            flags[k] = v
            rest = rest.strip()
        if op == "ARG" and not stages:
            k, _, v = rest.partition("=")
            args[k] = v
        elif op == "FROM":
            base, _, name = rest.partition(" AS ")
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
            stages.append(Stage(base.strip(), name.strip() or None, []))
        else:
            stages[-1].steps.append(Instruction(op, rest, flags))
    return stages


def dockerignore_excludes(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` (relative) out of the build context."""
    excluded = False
    parts = path.split("/")
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        pat = raw.strip()
        if not pat or pat.startswith("#"):
            continue
        negate = pat.startswith("!")
        pat = pat.lstrip("!").rstrip("/")
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            if fnmatch.fnmatch(prefix, pat) or (pat.startswith("**/") and
                                                fnmatch.fnmatch(parts[i - 1], pat[3:])):
                excluded = not negate
                break
    return excluded


STAGES = parse_dockerfile((REPO / "Dockerfile").read_text())
BUILD, FINAL = STAGES[0], STAGES[-1]
FINAL_ENV = dict(re.findall(r"(\w+)=(\S+)", " ".join(s.args for s in FINAL.all("ENV"))))


def test_dockerfile_final_stage_is_slim_non_root_and_drains():
    """Multi-stage; the final stage is a slim base with the built venv and config only, runs as
    a numeric non-root user, has a HEALTHCHECK on /healthz and STOPSIGNAL SIGTERM."""
    assert len(STAGES) == 2 and BUILD.name == "build"
    assert all("slim" in s.base for s in STAGES)
    user = FINAL.one("USER").args.split(":")
    assert all(part.isdigit() and int(part) > 0 for part in user)
    assert FINAL.one("STOPSIGNAL").args == "SIGTERM"
    health = FINAL.one("HEALTHCHECK")
    assert health.flags.get("interval") and health.flags.get("timeout")
    assert health.args.startswith("CMD [") and "/healthz" in health.args
    assert FINAL.one("ENTRYPOINT").words() == ["resilience-proxy"]
    assert FINAL.one("CMD").words() == ["run"]
    assert set(FINAL.one("EXPOSE").words()) == {"8080", "9901"}
    # nothing is built or installed in the final stage: it only creates its user
    for run in FINAL.all("RUN"):
        for command in re.split(r"&&", run.args):
            assert command.split()[0] in ("groupadd", "useradd"), command
    for copy in FINAL.all("COPY"):
        src = copy.words()[0]
        assert copy.flags.get("from") == "build" or src.startswith("config"), copy.args
    text = (REPO / "Dockerfile").read_text()
    assert not re.search(r"\b(gcc|g\+\+|build-essential|apt-get install|make)\b", text)
    assert FINAL_ENV["RP_CONFIG"] == "/etc/resilience-proxy/config.yaml"
    assert not [k for k in FINAL_ENV if SECRETISH.search(k)], "no secret baked into the image"


def test_dockerignore_keeps_the_context_to_what_the_image_copies():
    """Every COPY source is in the build context; git, venvs, tests, secrets are not."""
    for stage in STAGES:
        for copy in stage.all("COPY"):
            if "from" in copy.flags:
                continue
            for src in copy.words()[:-1]:
                assert not dockerignore_excludes(src), src
                for sub in (REPO / src).rglob("*") if (REPO / src).is_dir() else []:
                    if "__pycache__" not in sub.parts:
                        assert not dockerignore_excludes(str(sub.relative_to(REPO))), sub
    for path in (".git/config", ".venv/bin/python", "tests/conftest.py", "bench/x.py", ".env",
                 "proxy/__pycache__/cli.cpython-311.pyc", "deploy/compose.yaml", "config/.env"):
        assert dockerignore_excludes(path), path


class ImageReplay:
    """The Dockerfile's steps run on this machine: container paths live under ``root``."""

    ROOTS = re.compile(r"(?<![\w.-])/(opt|src|etc)(?=/|\s|$)")

    def __init__(self, root: Path) -> None:
        self.root = root

    def host(self, container_path: str) -> Path:
        return self.root / container_path.lstrip("/")

    def map(self, text: str) -> str:
        return self.ROOTS.sub(lambda m: str(self.root) + m.group(0), text)

    def copy(self, src: str, dest: str, cwd: Path) -> None:
        target = (cwd / dest) if not dest.startswith("/") else self.host(dest)
        source = REPO / src
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".env", "*.local.yaml")
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True, ignore=ignore)
        else:
            if dest.endswith("/"):
                target = target / source.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)

    def build(self) -> None:
        cwd = self.root
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        for step in BUILD.steps:
            if step.op == "WORKDIR":
                cwd = self.host(step.args)
                cwd.mkdir(parents=True, exist_ok=True)
            elif step.op == "COPY":
                *srcs, dest = step.words()
                for src in srcs:
                    self.copy(src, dest, cwd)
            elif step.op == "RUN":
                done = subprocess.run(["sh", "-c", self.map(step.args)], cwd=cwd, env=env,
                                      capture_output=True, text=True, timeout=600)
                assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
            else:
                assert step.op in ("ENV", "LABEL", "ARG"), f"the replay does not know {step.op}"

    def assemble(self) -> dict[str, str]:
        """The final stage's files and environment (its user creation is not replayed)."""
        for step in FINAL.all("COPY"):
            *srcs, dest = step.words()
            if step.flags.get("from") == "build":
                assert all(self.host(s).exists() for s in srcs) and srcs == [dest]
            else:
                for src in srcs:
                    self.copy(src, dest, self.root)
        env = {k: self.map(v).replace("$PATH", os.environ["PATH"]) for k, v in FINAL_ENV.items()}
        return env


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> tuple[ImageReplay, dict[str, str]]:
    replay = ImageReplay(tmp_path_factory.mktemp("image"))
    replay.build()
    return replay, replay.assemble()


def test_image_build_steps_install_a_working_proxy_without_pip(image):
    """The build stage's own RUN lines, replayed in a fresh venv, install the proxy (and no pip),
    and its entrypoint's `check` accepts the config the image ships at RP_CONFIG."""
    replay, env = image
    venv = replay.host("/opt/rp")
    assert (venv / "bin" / "resilience-proxy").exists()
    assert not list(venv.glob("bin/pip*")) and not list(venv.glob("lib/python3*/site-packages/pip"))
    exe = shutil.which(FINAL.one("ENTRYPOINT").words()[0], path=env["PATH"])
    assert exe is not None and Path(exe).is_relative_to(venv)
    assert Path(env["RP_CONFIG"]).is_relative_to(replay.root) and Path(env["RP_CONFIG"]).exists()
    done = subprocess.run([exe, "check"], env=env, cwd=replay.root, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(env["RP_CONFIG"] + ": OK")
    examples = replay.host("/etc/resilience-proxy/examples")
    shipped = {p.name for p in (REPO / "config" / "examples").glob("*.yaml")}
    assert {p.name for p in examples.glob("*.yaml")} == shipped


def test_image_serves_passes_its_healthcheck_and_drains_on_its_stop_signal(image):
    """The replayed image runs its ENTRYPOINT/CMD, answers a request, passes its own HEALTHCHECK
    command, exits 0 on its STOPSIGNAL, and the HEALTHCHECK then fails."""
    replay, env = image
    data, admin = free_port(), free_port()
    env = {**env, "RP_LISTEN": f"127.0.0.1:{data}", "RP_ADMIN_LISTEN": f"127.0.0.1:{admin}"}
    command = FINAL.one("ENTRYPOINT").words() + FINAL.one("CMD").words()
    health = json.loads(FINAL.one("HEALTHCHECK").args.removeprefix("CMD").strip())
    proc = subprocess.Popen([shutil.which(command[0], path=env["PATH"]), *command[1:]], env=env,
                            cwd=replay.root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{admin}/healthz", timeout=1)
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                assert time.monotonic() < deadline, "the image's proxy never came up"
                time.sleep(0.1)
        check = subprocess.run([shutil.which(health[0], path=env["PATH"]), *health[1:]], env=env,
                               timeout=30)
        assert check.returncode == 0
        req = urllib.request.Request(f"http://127.0.0.1:{data}/v1/chat/completions", method="POST",
                                     data=b'{"model": "gpt-4o-mini", "messages": []}')
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200 and resp.headers["x-rp-route"] == "chat"
        proc.send_signal(getattr(signal, FINAL.one("STOPSIGNAL").args))
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    after = subprocess.run([shutil.which(health[0], path=env["PATH"]), *health[1:]], env=env,
                           capture_output=True, timeout=30)
    assert after.returncode != 0


# --------------------------------------------------------------------------- compose


def required_vars(config_text: str) -> set[str]:
    """Environment variables a config needs (``${VAR}`` without a default)."""
    return set(re.findall(r"\$\{([A-Za-z_]\w*)\}", config_text))


def placeholder_env(names: set[str]) -> dict[str, str]:
    return {n: "redis://127.0.0.1:6379/0" if n == "REDIS_URL" else f"placeholder-{n.lower()}"
            for n in names}


def test_compose_runs_two_replicas_sharing_redis():
    """compose.yaml: Redis (health-checked) and two proxy replicas from the repo's Dockerfile,
    sharing one config whose state is Redis; distinct loopback ports; no secret inlined."""
    compose = yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())
    services = compose["services"]
    assert services["redis"]["healthcheck"]["test"][-1] == "ping"
    replicas = [s for name, s in services.items() if name.startswith("proxy-")]
    assert len(replicas) == 2
    published = []
    for svc in replicas:
        assert (REPO / "deploy" / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve() == \
            REPO / "Dockerfile"
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
        assert svc["environment"]["REDIS_URL"].startswith("redis://redis:")
        for k, v in svc["environment"].items():
            if SECRETISH.search(k) and k != "REDIS_URL":
                assert re.fullmatch(r"\$\{\w+(:-)?\}", v), f"{k} must come from the environment"
        [mount] = svc["volumes"]
        src, dest, _ = mount.split(":")
        assert dest == FINAL_ENV["RP_CONFIG"]
        config_path = REPO / "deploy" / src
        drain = load_config(config_path, env=placeholder_env(required_vars(config_path.read_text())))
        assert drain.config.state.backend == "redis"
        assert parse_duration(svc["stop_grace_period"]) > drain.config.server.drain_timeout
        assert svc["stop_signal"] == FINAL.one("STOPSIGNAL").args
        assert svc["read_only"] is True
        published += [p.split(":")[1] for p in svc["ports"]]
    assert len(published) == len(set(published)) == 4
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["observability"]
        for volume in services[name]["volumes"]:
            assert (REPO / "deploy" / volume.split(":")[0]).exists(), volume
    prom_targets = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    targets = prom_targets["scrape_configs"][0]["static_configs"][0]["targets"]
    assert sorted(targets) == sorted(f"{n}:9901" for n in services if n.startswith("proxy-"))


# --------------------------------------------------------------------------- Kubernetes


def k8s_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def proxy_container(deployment: dict[str, Any]) -> dict[str, Any]:
    [c] = [c for c in deployment["spec"]["template"]["spec"]["containers"]
           if c["name"] == "resilience-proxy"]
    return c


def env_sources(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def test_kubernetes_sidecar_matches_its_config():
    """The sidecar pod: app + proxy sharing localhost; config from the generated ConfigMap at the
    image's RP_CONFIG; every variable the config needs from a Secret (none inlined); probes on
    the admin port's /healthz and /readyz; the data plane on loopback only; grace period ≥
    preStop sleep + drain_timeout; resources and a locked-down security context."""
    kustom = yaml.safe_load((K8S / "sidecar" / "kustomization.yaml").read_text())
    [deployment] = [d for r in kustom["resources"] for d in k8s_docs(K8S / "sidecar" / r)
                    if d["kind"] == "Deployment"]
    [generator] = kustom["configMapGenerator"]
    config_text = (K8S / "sidecar" / generator["files"][0]).read_text()
    needed = required_vars(config_text)
    cfg = load_config(K8S / "sidecar" / generator["files"][0], env=placeholder_env(needed)).config
    pod = deployment["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["app", "resilience-proxy"]
    proxy = proxy_container(deployment)
    app = next(c for c in pod["containers"] if c["name"] == "app")

    # config: the generated ConfigMap mounted where the image reads it
    mount = next(m for m in proxy["volumeMounts"] if m["name"] == "resilience-proxy-config")
    volume = next(v for v in pod["volumes"] if v["name"] == "resilience-proxy-config")
    assert volume["configMap"]["name"] == generator["name"]
    assert Path(mount["mountPath"]) / generator["files"][0] == Path(FINAL_ENV["RP_CONFIG"])
    assert mount["readOnly"] is True

    # secrets: every ${VAR} the config needs comes from a Secret; nothing secret is inlined
    sources = env_sources(proxy)
    assert needed and needed <= set(sources)
    for name in needed:
        assert "secretKeyRef" in sources[name].get("valueFrom", {}), name
    for name, src in sources.items():
        assert not (SECRETISH.search(name) and "value" in src), name
    assert "OPENAI_API_KEY" not in json.dumps(app), "only the proxy holds the provider key"

    # listeners: data plane on the pod's loopback, the app pointed at it; admin on every interface
    host, port = cfg.server.listen.rsplit(":", 1)
    assert host == "127.0.0.1"
    assert any(e.get("value", "").startswith(f"http://127.0.0.1:{port}/") for e in app["env"])
    admin_host, admin_port = cfg.server.admin_listen.rsplit(":", 1)
    assert admin_host == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in proxy["ports"]}
    assert ports == {"rp-admin": int(admin_port)}
    assert cfg.server.admin_token is not None

    # probes on the admin port
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"),
                        ("startupProbe", "/healthz")):
        get = proxy[probe]["httpGet"]
        assert get["path"] == path and ports.get(get["port"], get["port"]) == int(admin_port), probe

    # shutdown: preStop sleep, then SIGTERM drains for drain_timeout, all inside the grace period
    sleep = proxy["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] >= float(sleep[1]) + cfg.server.drain_timeout
    assert cfg.server.drain_timeout == 25.0

    # resources and security
    for c in pod["containers"]:
        assert {"cpu", "memory"} <= set(c["resources"]["requests"]), c["name"]
    assert "memory" in proxy["resources"]["limits"]
    sc = proxy["securityContext"]
    assert sc["runAsUser"] == int(FINAL.one("USER").args.split(":")[0])
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert proxy["image"] in {i["name"] for i in kustom["images"]}


def test_kubernetes_shared_redis_overlay():
    """The shared-Redis overlay: builds on the sidecar, replaces the config with the same one on
    the Redis backend (REDIS_URL from the Secret), adds a password-protected Redis that only the
    app's pods can reach."""
    kustom = yaml.safe_load((K8S / "shared-redis" / "kustomization.yaml").read_text())
    assert "../sidecar" in kustom["resources"]
    for r in kustom["resources"]:
        assert (K8S / "shared-redis" / r).exists(), r
    [generator] = kustom["configMapGenerator"]
    assert generator["behavior"] == "replace" and generator["name"] == "resilience-proxy-config"
    redis_text = (K8S / "shared-redis" / "config.yaml").read_text()
    base_text = (K8S / "sidecar" / "config.yaml").read_text()
    redis_cfg = load_config(K8S / "shared-redis" / "config.yaml",
                            env=placeholder_env(required_vars(redis_text))).config
    base_cfg = load_config(K8S / "sidecar" / "config.yaml",
                           env=placeholder_env(required_vars(base_text))).config
    assert redis_cfg.state.backend == "redis" and redis_cfg.state.redis.url.startswith("redis://")
    # the same proxy apart from shared state and the fleet-wide budget it enables
    assert redis_cfg.server == base_cfg.server and redis_cfg.providers == base_cfg.providers
    assert [r.model_copy(update={"budgets": None}) for r in redis_cfg.routes] == base_cfg.routes

    [patch_ref] = kustom["patches"]
    patch = yaml.safe_load((K8S / "shared-redis" / patch_ref["path"]).read_text())
    sources = env_sources(proxy_container(patch))
    assert set(required_vars(redis_text)) - set(required_vars(base_text)) == {"REDIS_URL"}
    assert sources["REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == "resilience-proxy-keys"

    docs = {d["kind"]: d for d in k8s_docs(K8S / "shared-redis" / "redis.yaml")}
    redis = docs["StatefulSet"]["spec"]["template"]["spec"]["containers"][0]
    assert "--requirepass" in redis["args"] and "$(REDIS_PASSWORD)" in redis["args"]
    assert "secretKeyRef" in env_sources(redis)["REDIS_PASSWORD"]["valueFrom"]
    assert redis["args"][redis["args"].index("--appendonly") + 1] == "yes"
    assert docs["Service"]["spec"]["ports"][0]["port"] == 6379
    allowed = docs["NetworkPolicy"]["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    base = next(d for d in k8s_docs(K8S / "sidecar" / "deployment.yaml") if d["kind"] == "Deployment")
    assert allowed == base["spec"]["template"]["metadata"]["labels"]


def test_kubernetes_scraping_targets_the_sidecar_admin_port():
    """The Kubernetes scrape job and the PodMonitor select the sidecar's admin port by name, and
    the scrape job loads the alert rules."""
    base = next(d for d in k8s_docs(K8S / "sidecar" / "deployment.yaml") if d["kind"] == "Deployment")
    port_name = proxy_container(base)["ports"][0]["name"]
    prom = yaml.safe_load((PROM_DIR / "prometheus-kubernetes.yml").read_text())
    assert prom["rule_files"] == ["alerts.yml"]
    [job] = prom["scrape_configs"]
    assert job["job_name"] == "resilience-proxy" and job["metrics_path"] == "/metrics"
    keep = next(r for r in job["relabel_configs"] if r["action"] == "keep"
                and r["source_labels"] == ["__meta_kubernetes_pod_container_port_name"])
    assert re.fullmatch(keep["regex"], port_name)
    [monitor] = k8s_docs(K8S / "podmonitor.yaml")
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == port_name
    assert monitor["spec"]["selector"]["matchLabels"] == base["spec"]["template"]["metadata"]["labels"]
