#!/usr/bin/env bash
# FedPaGKD site entrypoint: check the settings, then exec fedpagkd-supernode (Flower's SuperNode
# that runs only the app bundle pinned by FEDPAGKD_APP_DIGEST: deploy/supernode.py). The key files
# and the data folder are checked by fedpagkd-supernode itself before it starts anything (the same
# checks on bare metal): present, readable by this user, the right kind, the data mounted.
#
# Environment (the names of deploy/sites/example-site.env; the paths as this container sees them):
#   FEDPAGKD_SITE_NAME      required, e.g. hospital-a-nbi
#   FEDPAGKD_MODALITY       required, wli | nbi
#   FEDPAGKD_SUPERLINK      required, coordinator host:port (must match a SAN of server.pem)
#   FEDPAGKD_DATA_DIR       default /data (ImageFolder tree: train/ val/ test/ <class>/*.png,
#                           or a manifest.csv; an optional site.json declares the modality)
#   FEDPAGKD_CA_CERT_FILE   default /run/secrets/ca.crt
#   FEDPAGKD_AUTH_KEY_FILE  default /run/secrets/supernode_auth_key (OpenSSH EC P-384)
#   FEDPAGKD_MAX_RETRIES    optional, give up connecting after N tries (default: never)
#   FEDPAGKD_MAX_WAIT_TIME  optional, give up connecting after N seconds (default: never)
#   FEDPAGKD_STATE_DIR      default /var/lib/fedpagkd-site (writable volume: egress.jsonl, what
#                           this site sent; node config state-dir)
#   FEDPAGKD_APP_DIGEST     required, sha256:... of the only app bundle this site runs
#                           (comma-separated for several; `python -m deploy.bundle` on the reviewed
#                           release prints it), or 'any' (rehearsals only); fedpagkd-supernode
#                           --app-digest checks every bundle before Flower installs it
#   FEDPAGKD_DEVICE         optional, this site's device (cpu | cuda | cuda:N | auto; node config
#                           device), instead of the coordinator's train.device
#   FEDPAGKD_EXTRA_NODE_CONFIG  optional, extra "key=value ..." node-config pairs
#   FLWR_HEALTH_ADDRESS     default 127.0.0.1:9098 (in-container gRPC health server)
# Extra arguments to the container are appended to flower-supernode's.
set -euo pipefail

die() { echo "fedpagkd-site: ERROR: $*" >&2; exit 64; }
warn() { echo "fedpagkd-site: WARNING: $*" >&2; }

SITE_NAME="${FEDPAGKD_SITE_NAME:-}"
MODALITY="${FEDPAGKD_MODALITY:-}"
MODALITY="${MODALITY,,}"  # 'NBI' and 'nbi' are the same (the ClientApp accepts both too)
SUPERLINK="${FEDPAGKD_SUPERLINK:-}"
DATA_PATH="${FEDPAGKD_DATA_DIR:-/data}"
CA_CERT="${FEDPAGKD_CA_CERT_FILE:-/run/secrets/ca.crt}"
AUTH_KEY="${FEDPAGKD_AUTH_KEY_FILE:-/run/secrets/supernode_auth_key}"
HEALTH="${FLWR_HEALTH_ADDRESS:-127.0.0.1:9098}"

[[ -n "$SITE_NAME" ]] || die "FEDPAGKD_SITE_NAME is not set (the site's name, e.g. hospital-a-nbi)"
[[ "$SITE_NAME" =~ ^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$ ]] \
  || die "FEDPAGKD_SITE_NAME='$SITE_NAME' is invalid: letters, digits, '.', '_' or '-' only"
case "$MODALITY" in
  wli|nbi) ;;
  "") die "FEDPAGKD_MODALITY is not set: use 'wli' (white light) or 'nbi' (narrow band)" ;;
  *) die "FEDPAGKD_MODALITY='${FEDPAGKD_MODALITY}' is invalid: use 'wli' or 'nbi' (any case)" ;;
esac
[[ -n "$SUPERLINK" ]] || die "FEDPAGKD_SUPERLINK is not set (coordinator address host:port, e.g. coordinator.example.org:8000)"
[[ "$SUPERLINK" == *:* ]] || die "FEDPAGKD_SUPERLINK='$SUPERLINK' has no port (expected host:port)"
[[ "$DATA_PATH" != *[\'\"]* ]] || die "FEDPAGKD_DATA_DIR must not contain quotes"

mkdir -p "${FLWR_HOME:-$HOME/.flwr}"
STATE_DIR="${FEDPAGKD_STATE_DIR:-/var/lib/fedpagkd-site}"
mkdir -p "$STATE_DIR" 2>/dev/null || true
[[ -d "$STATE_DIR" && -w "$STATE_DIR" ]] || die "state folder $STATE_DIR is not writable by uid $(id -u): mount a volume there (its egress.jsonl is this site's record of what it sent)"
APP_DIGEST="${FEDPAGKD_APP_DIGEST:-}"
[[ -n "$APP_DIGEST" ]] || die "FEDPAGKD_APP_DIGEST is not set: the digest of the app bundle this site reviewed (python -m deploy.bundle on that release prints it), or 'any' to run whatever the coordinator submits"
if [[ "$APP_DIGEST" == "any" ]]; then
  warn "FEDPAGKD_APP_DIGEST=any: this site runs whatever app bundle the coordinator submits"
else
  [[ "$APP_DIGEST" =~ ^sha256:[0-9a-f]{64}(,sha256:[0-9a-f]{64})*$ ]] \
    || die "FEDPAGKD_APP_DIGEST='$APP_DIGEST' is not sha256:<64 hex digits> (comma-separated for several; python -m deploy.bundle prints it)"
fi
DEVICE="${FEDPAGKD_DEVICE:-}"
[[ "$DEVICE" =~ ^(|cpu|auto|cuda|cuda:[0-9]+)$ ]] || die "FEDPAGKD_DEVICE='$DEVICE' is invalid: use cpu, auto, cuda or cuda:N"

NODE_CONFIG="site-name='$SITE_NAME' modality='$MODALITY' data-path='$DATA_PATH' state-dir='$STATE_DIR'"
[[ -z "$DEVICE" ]] || NODE_CONFIG="$NODE_CONFIG device='$DEVICE'"
if [[ -n "${FEDPAGKD_EXTRA_NODE_CONFIG:-}" ]]; then
  NODE_CONFIG="$NODE_CONFIG $FEDPAGKD_EXTRA_NODE_CONFIG"
fi

args=(
  --app-digest "$APP_DIGEST"
  --superlink "$SUPERLINK"
  --root-certificates "$CA_CERT"
  --auth-supernode-private-key "$AUTH_KEY"
  --node-config "$NODE_CONFIG"
  --health-server-address "$HEALTH"
)
[[ -z "${FEDPAGKD_MAX_RETRIES:-}" ]] || args+=(--max-retries "$FEDPAGKD_MAX_RETRIES")
[[ -z "${FEDPAGKD_MAX_WAIT_TIME:-}" ]] || args+=(--max-wait-time "$FEDPAGKD_MAX_WAIT_TIME")

echo "fedpagkd-site: site=$SITE_NAME modality=$MODALITY superlink=$SUPERLINK data=$DATA_PATH pinned bundle(s): $APP_DIGEST"
exec fedpagkd-supernode "${args[@]}" "$@"
