# syntax=docker/dockerfile:1
# resilience-proxy sidecar image. Config is read from /etc/resilience-proxy/config.yaml
# (mount a ConfigMap or file there); provider keys come from the environment.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY policies ./policies
RUN python -m venv /opt/rp && /opt/rp/bin/pip install --no-cache-dir .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home rp
COPY --from=build /opt/rp /opt/rp
COPY config /etc/resilience-proxy/examples
COPY config/default.yaml /etc/resilience-proxy/config.yaml
ENV PATH=/opt/rp/bin:$PATH \
    RP_CONFIG=/etc/resilience-proxy/config.yaml \
    RP_LISTEN=0.0.0.0:8080 \
    RP_ADMIN_LISTEN=0.0.0.0:9901 \
    PYTHONUNBUFFERED=1
USER 10001
EXPOSE 8080 9901
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=2s --retries=3 \
  CMD python -c "import urllib.request,os,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9901/healthz', timeout=2).status == 200 else 1)"
ENTRYPOINT ["resilience-proxy"]
CMD ["run"]
