# FedPaGKD hospital site image: Flower SuperNode (fedpagkd-supernode: only the pinned app bundle)
# + the FedPaGKD ClientApp's deps.
#
# Build from the REPOSITORY ROOT (the build context must contain pyproject.toml):
#   docker build -f deploy/docker/site.Dockerfile -t fedpagkd-site:0.1.0-cpu .
# CUDA variant (torch wheels from the PyTorch CUDA index; run with `--gpus all`):
#   docker build -f deploy/docker/site.Dockerfile \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#     -t fedpagkd-site:0.1.0-cu128 .
#
# No secrets are baked in: the CA certificate and the site's SuperNode auth key are
# mounted at run time (compose secrets -> /run/secrets/...), the data read-only at /data.
# Exclusions for the build context: site.Dockerfile.dockerignore (next to this file).

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---------------------------------------------------------------- build stage
FROM ${PYTHON_IMAGE} AS build

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# CPU by default. For CUDA pass the matching PyTorch index, e.g. .../whl/cu128.
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

# 1) torch + torchvision first, from the chosen (CPU or CUDA) index ...
# POSIX sh, not bash arrays: a builder that ignores SHELL (podman's default OCI format) runs /bin/sh.
RUN if [ -n "${WHEELHOUSE}" ]; then set -- --no-index --find-links "${WHEELHOUSE}"; \
    else set -- --index-url "${TORCH_INDEX_URL}"; fi \
 && pip install "$@" "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
 && pip freeze | grep -E '^(torch|torchvision)==' > /opt/torch-pins.txt

# 2) ... then the app and the rest of its deps, constrained to the torch just installed
#    (for the default CPU args this is exactly `pip install -c constraints-cpu.txt .`).
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

LABEL org.opencontainers.image.title="fedpagkd-site" \
      org.opencontainers.image.description="FedPaGKD hospital site: Flower SuperNode + ClientApp" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN groupadd --system --gid "${APP_GID}" fedpagkd \
 && useradd --system --uid "${APP_UID}" --gid fedpagkd --create-home \
        --home-dir /home/fedpagkd --shell /usr/sbin/nologin fedpagkd \
 && mkdir -p /data \
 && chown fedpagkd:fedpagkd /data

COPY --from=build /opt/venv /opt/venv
COPY --chmod=0755 deploy/docker/site-entrypoint.sh /usr/local/bin/fedpagkd-site
COPY --chmod=0755 deploy/docker/healthcheck.py /usr/local/bin/fedpagkd-healthcheck
# The SuperNode that checks every app bundle against FEDPAGKD_APP_DIGEST before Flower installs it:
# site code from this image, not from the bundle the coordinator submits.
COPY --chmod=0755 deploy/supernode.py /usr/local/bin/fedpagkd-supernode

ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FLWR_HOME=/home/fedpagkd/.flwr \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FEDPAGKD_DATA_DIR=/data \
    FEDPAGKD_CA_CERT_FILE=/run/secrets/ca.crt \
    FEDPAGKD_AUTH_KEY_FILE=/run/secrets/supernode_auth_key \
    FLWR_HEALTH_ADDRESS=127.0.0.1:9098

# Numeric, so that runtimes enforcing runAsNonRoot can check it.
USER ${APP_UID}:${APP_GID}
WORKDIR /home/fedpagkd

# The SuperNode opens no port to the outside: it dials the coordinator's SuperLink.
# Its Runtime API (127.0.0.1:9094) and health server stay inside the container.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "/usr/local/bin/fedpagkd-healthcheck"]

ENTRYPOINT ["/usr/local/bin/fedpagkd-site"]
CMD []
