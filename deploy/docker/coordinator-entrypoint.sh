#!/usr/bin/env bash
# FedPaGKD coordinator entrypoint: check the certificates, then exec flower-superlink
# with TLS and SuperNode authentication (only registered site keys may connect).
#
# Environment:
#   FEDPAGKD_SUPERLINK_HOST  default 0.0.0.0 (listen address inside the container)
#   FEDPAGKD_SUPERLINK_PORT  default 8000 (Fleet + Control + Runtime API, HTTPS)
#   FEDPAGKD_STATE_DIR       default /var/lib/fedpagkd (volume: state.db, FABs, run outputs)
#   FEDPAGKD_CA_CERT / FEDPAGKD_SERVER_CERT / FEDPAGKD_SERVER_KEY
#                            default /run/secrets/{ca.crt,server.pem,server.key}
#   FLWR_HEALTH_ADDRESS      default 127.0.0.1:9099 (in-container gRPC health server)
# Extra arguments to the container are appended to flower-superlink.
set -euo pipefail

die() { echo "fedpagkd-coordinator: ERROR: $*" >&2; exit 64; }

HOST="${FEDPAGKD_SUPERLINK_HOST:-0.0.0.0}"
PORT="${FEDPAGKD_SUPERLINK_PORT:-8000}"
STATE_DIR="${FEDPAGKD_STATE_DIR:-/var/lib/fedpagkd}"
CA_CERT="${FEDPAGKD_CA_CERT:-/run/secrets/ca.crt}"
SERVER_CERT="${FEDPAGKD_SERVER_CERT:-/run/secrets/server.pem}"
SERVER_KEY="${FEDPAGKD_SERVER_KEY:-/run/secrets/server.key}"
HEALTH="${FLWR_HEALTH_ADDRESS:-127.0.0.1:9099}"

for f in "$CA_CERT" "$SERVER_CERT" "$SERVER_KEY"; do
  [[ -e "$f" ]] || die "$f is missing: mount it as a secret (see deploy/compose/coordinator.yaml)"
  [[ -r "$f" ]] || die "$f is not readable by uid $(id -u): on the host run 'sudo chown $(id -u) <file>; chmod 0400 <file>'"
done
grep -q "BEGIN CERTIFICATE" "$CA_CERT" || die "$CA_CERT is not a PEM certificate"
grep -q "BEGIN CERTIFICATE" "$SERVER_CERT" || die "$SERVER_CERT is not a PEM certificate"
grep -q "PRIVATE KEY" "$SERVER_KEY" || die "$SERVER_KEY is not a PEM private key"

[[ -d "$STATE_DIR" && -w "$STATE_DIR" ]] || die "$STATE_DIR is not a writable folder (mount the state volume)"
mkdir -p "${FLWR_HOME:-$STATE_DIR/flwr-home}"

echo "fedpagkd-coordinator: SuperLink on https://$HOST:$PORT (TLS, SuperNode auth on), state $STATE_DIR/state.db"
exec flower-superlink \
  --ssl-ca-certfile "$CA_CERT" \
  --ssl-certfile "$SERVER_CERT" \
  --ssl-keyfile "$SERVER_KEY" \
  --enable-supernode-auth \
  --disable-runtime-dependency-installation \
  --host "$HOST" \
  --port "$PORT" \
  --database "$STATE_DIR/state.db" \
  --health-server-address "$HEALTH" \
  "$@"
