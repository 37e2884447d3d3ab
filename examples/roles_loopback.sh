#!/usr/bin/env bash
# The three roles of an example, deployed for real on 127.0.0.1 (TLS, SuperNode auth, signed app):
#
#   examples/roles_loopback.sh medical|satellite [WORK_DIR]
#
# 1. site admins' data: one synthetic unlabelled archive per site, and a labelled set held
#    by the data scientist (python -m examples.demo --data-only);
# 2. coordinator and sites: examples/deployment/run_loopback.sh (certificates, SuperLink,
#    one SuperNode per site on its own folder, flwr run, 2 rounds), given the sites' folders
#    (SITE_DATA_ROOT), the domain and the example's run config;
# 3. data scientist: fedmoco finetune (pretrained vs random init), fedmoco export.
set -euo pipefail

DOMAIN="${1:?usage: $0 medical|satellite [WORK_DIR]}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
case "$DOMAIN" in
  medical)   SITES="hospital-a hospital-b"; IMAGES=dicom ;;
  satellite) SITES="station-a station-b";   IMAGES=patches ;;
  *) echo "$0: domain must be medical or satellite, got '$DOMAIN'" >&2; exit 2 ;;
esac
WORK="$(mkdir -p "${2:-$DOMAIN-loopback}" && cd "${2:-$DOMAIN-loopback}" && pwd)"
PY="${VENV_BIN:-$REPO/.venv/bin}/python"
DEPLOY="$REPO/examples/deployment/run_loopback.sh"

echo "== site admins: synthetic data (one folder per site) and the data scientist's labelled set"
(cd "$REPO" && "$PY" -m examples.demo --domain "$DOMAIN" --out "$WORK/data" --sites 2 --data-only) | tee "$WORK/data.txt"
RUN_CONFIG="$(sed -n 's/^run config: //p' "$WORK/data.txt")"
mkdir -p "$WORK/site-data"
i=0
for site in $SITES; do  # each site's folder under its own name
  rm -rf "$WORK/site-data/$site"
  mv "$WORK/data/sites/site-$i" "$WORK/site-data/$site"
  i=$((i + 1))
done

echo "== coordinator and sites: the secured deployment on 127.0.0.1"
DOMAIN="$DOMAIN" SITES="$SITES" SITE_DATA_ROOT="$WORK/site-data" RUN_CONFIG="$RUN_CONFIG" \
  "$DEPLOY" "$WORK/deployment"

echo "== data scientist: fine-tune the aggregated encoder, then export it"
TEST_ARGS=()  # each example has a separate held-out archive (80 patients, 24 scenes)
if [ -f "$WORK/data/test/labels.csv" ]; then
  TEST_ARGS=(--test "$WORK/data/test/$IMAGES" --test-labels "$WORK/data/test/labels.csv")
fi
"$PY" -m fedmoco.cli finetune --checkpoint "$WORK/deployment/server/encoder.pt" \
  --data "$WORK/data/labelled/$IMAGES" --labels "$WORK/data/labelled/labels.csv" "${TEST_ARGS[@]}" \
  --seeds 0 1 2 --epochs 15 --out "$WORK/finetune"
"$PY" -m fedmoco.cli export "$WORK/deployment/server/encoder.pt" --out "$WORK/export"
