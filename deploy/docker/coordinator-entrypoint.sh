#!/usr/bin/env bash
# FedPaGKD coordinator entrypoint: check the certificates, then exec flower-superlink
# with TLS and SuperNode authentication (only registered site keys may connect).
#
# Environment:
#   FEDPAGKD_SUPERLINK_HOST  default 0.0.0.0 (listen address inside the container)
#   FEDPAGKD_SUPERLINK_PORT  default 8000 (Fleet API, HTTPS: the port the sites dial)
#   FEDPAGKD_CONTROL_ADDRESS default 0.0.0.0:9093 (Control + Runtime API, HTTPS: the operator's
#                            flwr CLI only; compose publishes it on the host's 127.0.0.1 only)
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

CONTROL="${FEDPAGKD_CONTROL_ADDRESS:-0.0.0.0:9093}"
[[ "${CONTROL##*:}" != "$PORT" ]] || die "FEDPAGKD_CONTROL_ADDRESS=$CONTROL uses the Fleet API port $PORT: give the Control API its own port"
export FEDPAGKD_STATE_DIR="$STATE_DIR"  # the ServerApp takes a relative fed.run_dir from here

echo "fedpagkd-coordinator: SuperLink Fleet API on https://$HOST:$PORT, Control API on https://$CONTROL (TLS, SuperNode auth on), state $STATE_DIR/state.db"
# flower-superlink with the Control API on its own listener (deploy/superlink.py)
exec fedpagkd-superlink \
  --fleet-api-address "$HOST:$PORT" \
  --control-api-address "$CONTROL" \
  --ssl-ca-certfile "$CA_CERT" \
  --ssl-certfile "$SERVER_CERT" \
  --ssl-keyfile "$SERVER_KEY" \
  --enable-supernode-auth \
  --disable-runtime-dependency-installation \
  --database "$STATE_DIR/state.db" \
  --health-server-address "$HEALTH" \
  "$@"
