# FedPaGKD coordinator image: Flower SuperLink + the FedPaGKD ServerApp and its deps.
#
# In Flower 1.41 the SuperLink (default `--isolation subprocess`) starts a
# `flower-superexec` child, which starts one `flwr-serverapp` process per run; that
# process loads `server.app:app` from the run's FAB. All of it runs in this one
# container, so the image carries the ServerApp's dependencies (torch, timm, ...).
#
# Build from the REPOSITORY ROOT:
#   docker build -f deploy/docker/coordinator.Dockerfile -t fedpagkd-coordinator:0.1.0 .
#
# No secrets are baked in: ca.crt, server.pem and server.key are mounted at run time.
# Exclusions for the build context: coordinator.Dockerfile.dockerignore.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---------------------------------------------------------------- build stage
FROM ${PYTHON_IMAGE} AS build

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# The server only aggregates: CPU torch is enough.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
ARG TORCHVISION_VERSION=0.28.0

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# Air-gapped build (deploy/README.md, "Air-gapped build"): every wheel in deploy/docker/wheelhouse/
# and --build-arg WHEELHOUSE=/wheelhouse: pip then reads that folder only (--no-index), never an
# index. Empty (the default): torch from TORCH_INDEX_URL, the rest from PyPI. The folder stays in
# this build stage; the runtime image gets only the venv.
ARG WHEELHOUSE=
COPY deploy/docker/wheelhouse/ /wheelhouse/

# python3, not python: a Debian base made with debootstrap (the air-gapped path) has no `python`.
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:${PATH}

# POSIX sh, not bash arrays: a builder that ignores SHELL (podman's default OCI format) runs /bin/sh.
RUN if [ -n "${WHEELHOUSE}" ]; then set -- --no-index --find-links "${WHEELHOUSE}"; \
    else set -- --index-url "${TORCH_INDEX_URL}"; fi \
 && pip install "$@" "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
 && pip freeze | grep -E '^(torch|torchvision)==' > /opt/torch-pins.txt

WORKDIR /src
COPY pyproject.toml README.md constraints-cpu.txt ./
COPY common ./common
COPY client ./client
COPY server ./server
COPY benchmarks ./benchmarks
RUN pip install ${WHEELHOUSE:+--no-index --find-links "${WHEELHOUSE}"} -c /opt/torch-pins.txt . \
 && pip check

# ---------------------------------------------------------------- runtime stage
FROM ${PYTHON_IMAGE} AS runtime

ARG APP_UID=10001
ARG APP_GID=10001

LABEL org.opencontainers.image.title="fedpagkd-coordinator" \
      org.opencontainers.image.description="FedPaGKD coordinator: Flower SuperLink + ServerApp" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN groupadd --system --gid "${APP_GID}" fedpagkd \
 && useradd --system --uid "${APP_UID}" --gid fedpagkd --create-home \
        --home-dir /home/fedpagkd --shell /usr/sbin/nologin fedpagkd \
 && mkdir -p /var/lib/fedpagkd \
 && chown fedpagkd:fedpagkd /var/lib/fedpagkd

COPY --from=build /opt/venv /opt/venv
COPY --chmod=0755 deploy/docker/coordinator-entrypoint.sh /usr/local/bin/fedpagkd-coordinator
COPY --chmod=0755 deploy/docker/healthcheck.py /usr/local/bin/fedpagkd-healthcheck
COPY --chmod=0755 deploy/superlink.py /usr/local/bin/fedpagkd-superlink

# State (SQLite link state, FLWR_HOME with installed FABs, ServerApp outputs: the
# ServerApp's working directory is /var/lib/fedpagkd) lives in one volume.
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FLWR_HOME=/var/lib/fedpagkd/flwr-home \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FEDPAGKD_SUPERLINK_HOST=0.0.0.0 \
    FEDPAGKD_SUPERLINK_PORT=8000 \
    FEDPAGKD_STATE_DIR=/var/lib/fedpagkd \
    FEDPAGKD_CA_CERT=/run/secrets/ca.crt \
    FEDPAGKD_SERVER_CERT=/run/secrets/server.pem \
    FEDPAGKD_SERVER_KEY=/run/secrets/server.key \
    FLWR_HEALTH_ADDRESS=127.0.0.1:9099

# Numeric, so that runtimes enforcing runAsNonRoot can check it.
USER ${APP_UID}:${APP_GID}
WORKDIR /var/lib/fedpagkd
VOLUME ["/var/lib/fedpagkd"]

# One HTTPS port carries the Fleet API (SuperNodes), the Control API (flwr CLI) and the
# Runtime API (the ServerApp, over loopback).
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["python", "/usr/local/bin/fedpagkd-healthcheck", "127.0.0.1:9099", "--superexec", "--cert", "/run/secrets/server.pem"]

ENTRYPOINT ["/usr/local/bin/fedpagkd-coordinator"]
CMD []
