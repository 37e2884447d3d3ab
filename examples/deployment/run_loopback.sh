#!/usr/bin/env bash
# A complete FedMoCo deployment on one machine (127.0.0.1), to try the real thing before
# spreading it over hospitals: TLS SuperLink with SuperNode authentication, two sites with
# their own DICOM archives and privacy budgets, two rounds. Each step is what the operator
# or a site runs on its own machine in a real deployment (see docs/federation.md).
#
#   examples/deployment/run_loopback.sh [WORK_DIR]      (default: ./deployment-demo)
#
# Everything it starts is stopped on exit (Ctrl-C included), by process-group id.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
WORK="$(mkdir -p "${1:-deployment-demo}" && cd "${1:-deployment-demo}" && pwd)"
VENV_BIN="${VENV_BIN:-$REPO/.venv/bin}"
PY="$VENV_BIN/python"
export PATH="$VENV_BIN:$PATH"   # the SuperLink starts flower-superexec by name
PORT="${PORT:-9093}"
SITES=(hospital-a hospital-b)

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

echo "== 1. credentials: CA, SuperLink certificate, one key pair per site"
"$PY" "$REPO/examples/deployment/make_certs.py" "$WORK/certs" --host 127.0.0.1 --host localhost \
  $(printf -- '--site %s ' "${SITES[@]}")

echo "== 2. SuperLink with TLS and SuperNode authentication (port $PORT)"
FLWR_HOME="$WORK/home-superlink" start "$WORK/superlink.log" flower-superlink \
  --ssl-ca-certfile "$WORK/certs/ca.crt" --ssl-certfile "$WORK/certs/server.crt" \
  --ssl-keyfile "$WORK/certs/server.key" --enable-supernode-auth \
  --disable-runtime-dependency-installation --host 127.0.0.1 --port "$PORT"
for _ in $(seq 60); do
  curl -sf --cacert "$WORK/certs/ca.crt" "https://127.0.0.1:$PORT/health" >/dev/null && break
  sleep 1
done

echo "== 3. the operator's flwr connection, and each site's public key registered"
mkdir -p "$WORK/home-operator"
cat >"$WORK/home-operator/config.toml" <<EOF
[superlink]
default = "fedmoco"

[superlink.fedmoco]
address = "127.0.0.1:$PORT"
root-certificates = "$WORK/certs/ca.crt"
EOF
for site in "${SITES[@]}"; do
  FLWR_HOME="$WORK/home-operator" flwr supernode register "$WORK/certs/$site.pub" fedmoco
done

echo "== 4. one SuperNode per site, with its own data, budget and state folder"
i=0
for site in "${SITES[@]}"; do
  "$PY" -c "from domains.medical.demo import make_demo_archive as m; m('$WORK/data/$site', seed=$i)"
  FLWR_HOME="$WORK/home-$site" start "$WORK/supernode-$site.log" flower-supernode \
    --superlink "127.0.0.1:$PORT" --root-certificates "$WORK/certs/ca.crt" \
    --auth-supernode-private-key "$WORK/certs/$site" --port "$((PORT + 10 + i))" \
    --node-config "domain=\"medical\" data-path=\"$WORK/data/$site\" dp-epsilon=8.0 dp-delta=1e-5 state-dir=\"$WORK/state/$site\""
  i=$((i + 1))
done

echo "== 5. the federation"
cd "$REPO"
FLWR_HOME="$WORK/home-operator" flwr run . fedmoco --stream \
  --run-config "num-server-rounds=2 min-nodes=${#SITES[@]} out-dir=\"$WORK/server\""
echo
echo "aggregated encoder: $WORK/server/encoder.pt"
