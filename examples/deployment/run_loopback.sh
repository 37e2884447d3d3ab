#!/usr/bin/env bash
# A complete, secured FedMoCo deployment on one machine (127.0.0.1), to try the real thing
# before spreading it over hospitals: TLS, the Control API on a loopback-only port and the
# Fleet API alone on the sites' port, SuperNode authentication with keys each site made
# itself, a SuperLink database, SuperNodes that run only the coordinator-signed app, two
# sites with their own DICOM archives and privacy budgets, two rounds. Each step is what
# the coordinator or a site runs on its own machine in a real deployment (docs/federation.md).
#
#   examples/deployment/run_loopback.sh [WORK_DIR]      (default: ./deployment-demo)
#
# Optional environment: DOMAIN (medical | satellite | images, default medical), SITES
# (space-separated names, default "hospital-a hospital-b"), SITE_DATA_ROOT (each site reads
# SITE_DATA_ROOT/<site>; default: a generated demo archive per site), RUN_CONFIG (extra
# run-config pairs for flwr run), FLEET_PORT / CONTROL_PORT (default 9092 / 9093).
#
# Everything it starts is stopped on exit (Ctrl-C included), by process-group id.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
WORK="$(mkdir -p "${1:-deployment-demo}" && cd "${1:-deployment-demo}" && pwd)"
VENV_BIN="${VENV_BIN:-$REPO/.venv/bin}"
PY="$VENV_BIN/python"
export PATH="$VENV_BIN:$PATH"   # the SuperLink starts flower-superexec by name
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
FLEET_PORT="${FLEET_PORT:-9092}"     # the sites' port (public in a real deployment)
CONTROL_PORT="${CONTROL_PORT:-9093}" # the coordinator's port (loopback only)
DOMAIN="${DOMAIN:-medical}"
read -r -a SITES <<<"${SITES:-hospital-a hospital-b}"
SIGNER=fedmoco-coordinator

PIDS=()
cleanup() {
  for pid in "${PIDS[@]:-}"; do
    [ -n "$pid" ] && kill -TERM -- "-$pid" 2>/dev/null || true
  done
}
trap cleanup EXIT INT TERM
start() {  # start LOG CMD...: in its own session, so cleanup stops its children too
  local log="$1"; shift
  setsid "$@" >"$log" 2>&1 &
  PIDS+=("$!")
}
wait_health() {  # wait_health PORT
  for _ in $(seq 90); do
    curl -sf --cacert "$WORK/certs/ca.crt" "https://127.0.0.1:$1/health" >/dev/null && return 0
    sleep 1
  done
  echo "no answer on port $1; see $WORK/superlink.log" >&2
  return 1
}

echo "== 1. coordinator: TLS credentials (no site keys)"
"$PY" "$REPO/examples/deployment/make_certs.py" "$WORK/certs"

echo "== 2. coordinator: app-signing key, and the app signed"
mkdir -p "$WORK/coordinator"
"$PY" -m fedmoco.cli keygen --type ed25519 --out "$WORK/coordinator/keys" --name "$SIGNER" \
  | tee "$WORK/coordinator/keygen.txt"
TRUSTED_LINE="$(tail -n 1 "$WORK/coordinator/keygen.txt")"
# Sign a copy, so this repository stays unchanged: the files flwr run would send.
rm -rf "$WORK/coordinator/app"
"$PY" -c "from pathlib import Path; from fedmoco.appsign import copy_app_files as c; c(Path('$REPO'), Path('$WORK/coordinator/app'))"
"$PY" -m fedmoco.cli sign-app "$WORK/coordinator/app" --key "$WORK/coordinator/keys/$SIGNER" --key-id "$SIGNER"

echo "== 3. each site: its own key pair (only the .pub goes to the coordinator)"
for site in "${SITES[@]}"; do
  "$PY" -m fedmoco.cli keygen --out "$WORK/$site/keys" --name "$site"
  echo "$TRUSTED_LINE" >"$WORK/$site/trusted-entities.yaml"
done

echo "== 4. coordinator: SuperLink (Control API on 127.0.0.1:$CONTROL_PORT, Fleet API alone on :$FLEET_PORT)"
FLWR_HOME="$WORK/superlink" start "$WORK/superlink.log" "$PY" -m server.superlink \
  --fleet-host 127.0.0.1 --fleet-port "$FLEET_PORT" --host 127.0.0.1 --port "$CONTROL_PORT" \
  --database "$WORK/superlink/state.db" \
  --ssl-ca-certfile "$WORK/certs/ca.crt" --ssl-certfile "$WORK/certs/server.crt" \
  --ssl-keyfile "$WORK/certs/server.key" --enable-supernode-auth --disable-runtime-dependency-installation
wait_health "$CONTROL_PORT"
wait_health "$FLEET_PORT"

echo "== 5. coordinator: flwr connection (loopback port) and the sites' public keys registered"
mkdir -p "$WORK/coordinator/flwr-home"
printf '[superlink]\ndefault = "fedmoco"\n\n[superlink.fedmoco]\naddress = "127.0.0.1:%s"\nroot-certificates = "%s"\n' \
  "$CONTROL_PORT" "$WORK/certs/ca.crt" >"$WORK/coordinator/flwr-home/config.toml"
for site in "${SITES[@]}"; do
  FLWR_HOME="$WORK/coordinator/flwr-home" flwr supernode register "$WORK/$site/keys/$site.pub" fedmoco
done

echo "== 6. each site: SuperNode that runs only the signed app, with its own data, budget and state"
i=0
for site in "${SITES[@]}"; do
  if [ -n "${SITE_DATA_ROOT:-}" ]; then
    DATA="$SITE_DATA_ROOT/$site"
  else
    DATA="$WORK/$site/data"
    "$PY" -m fedmoco.cli make-demo-data --domain "$DOMAIN" --out "$DATA" --seed "$i" >/dev/null
  fi
  FLWR_HOME="$WORK/$site/flwr-home" start "$WORK/supernode-$site.log" "$PY" -m clients.supernode \
    --superlink "127.0.0.1:$FLEET_PORT" --root-certificates "$WORK/certs/ca.crt" \
    --auth-supernode-private-key "$WORK/$site/keys/$site" \
    --trusted-entities "$WORK/$site/trusted-entities.yaml" --host 127.0.0.1 --port "$((FLEET_PORT + 10 + i))" \
    --node-config "site-name=\"$site\" domain=\"$DOMAIN\" data-path=\"$DATA\" dp-epsilon=8.0 dp-delta=1e-5 state-dir=\"$WORK/$site/state\""
  i=$((i + 1))
done

echo "== 7. coordinator: the federation"
FLWR_HOME="$WORK/coordinator/flwr-home" flwr run "$WORK/coordinator/app" fedmoco --stream \
  --run-config "num-server-rounds=2 min-nodes=${#SITES[@]} out-dir=\"$WORK/server\" ${RUN_CONFIG:-}"
echo
echo "aggregated encoder: $WORK/server/encoder.pt"
