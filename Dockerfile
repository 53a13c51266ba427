# syntax=docker/dockerfile:1
# resilience-proxy sidecar image.
#
#   docker build -t resilience-proxy .
#   docker run --rm -p 8080:8080 -p 9901:9901 resilience-proxy            # the bundled demo config
#   docker run --rm -p 8080:8080 -p 9901:9901 -e OPENAI_API_KEY \
#     -v "$PWD/config/examples/openai.yaml:/etc/resilience-proxy/config.yaml:ro" resilience-proxy
#
# Config is read from /etc/resilience-proxy/config.yaml (mount a file or a ConfigMap there);
# provider keys and the admin token come from the environment (${VAR} in the config).
# docs/deploy.md has the details. tests/test_deploy.py replays this file's build steps in a
# fresh virtualenv and runs the result, so keep every step one that it can replay.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- build: a venv, without pip
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY policies ./policies
# The runtime venv gets no pip, setuptools or wheel: the base image's pip installs into it.
RUN python -m venv --without-pip /opt/rp \
 && python -m pip --python /opt/rp/bin/python install --no-cache-dir --disable-pip-version-check .

# ---------------------------------------------------------------- runtime: the venv and config only
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="resilience-proxy" \
      org.opencontainers.image.description="A resilience sidecar in front of AI providers" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 rp \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin rp
COPY --from=build /opt/rp /opt/rp
COPY config/default.yaml /etc/resilience-proxy/config.yaml
COPY config/examples /etc/resilience-proxy/examples
# RP_LISTEN / RP_ADMIN_LISTEN are read by the bundled configs (${RP_LISTEN:-...}); inside a
# container both planes listen on every interface so that -p and Kubernetes probes reach them.
# Secrets are never baked in: pass OPENAI_API_KEY, RP_ADMIN_TOKEN, REDIS_URL... with -e.
ENV PATH=/opt/rp/bin:$PATH \
    RP_CONFIG=/etc/resilience-proxy/config.yaml \
    RP_LISTEN=0.0.0.0:8080 \
    RP_ADMIN_LISTEN=0.0.0.0:9901 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
EXPOSE 8080 9901
# SIGTERM drains: stop accepting, finish in-flight requests up to server.drain_timeout, exit 0.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import os,sys,urllib.request as u; port=os.environ.get('RP_ADMIN_LISTEN','0.0.0.0:9901').rpartition(':')[2]; sys.exit(0 if u.urlopen('http://127.0.0.1:'+port+'/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["resilience-proxy"]
CMD ["run"]
