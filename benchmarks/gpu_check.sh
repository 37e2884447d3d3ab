#!/usr/bin/env bash
# The CUDA checks of issue 11 on a lent GPU, in at most BUDGET_S seconds, in this order: the MoCo
# step with each normalisation against lightly (leak-guard cost), the satellite and medical feeds
# against the step, batched views on CUDA against the same views on the CPU, a user's CLI journey,
# and last the step with torch.compile'd encoders.
#   OUT=/some/folder bash benchmarks/gpu_check.sh
# Results: $OUT/gpu_check.jsonl (one JSON line per benchmark), $OUT/rc.txt, and every log and
# table in $OUT/gpu_check.tgz, refreshed after each step (the device tool returns few files, and
# a call cut short keeps what the finished steps wrote). Each step's last lines also go to stdout.
# The whole script keeps to BUDGET_S seconds (default 540: under the tool's 600 s per call);
# a step gets what is left of it when that is less than its own limit, and is skipped under 20 s.
# ONLY="feed_satellite feed_medical" runs those steps alone (a rerun with little device time left).
# The lent machines have torch but not monai/pydicom/rasterio/lightly/cryptography: carry them as wheels
# in .whl-f (see docs/engine.md, "Checking the CUDA path"); they are installed here if present.
set -u
DEADLINE=$((SECONDS + ${BUDGET_S:-540}))
PY=${PYTHON:-.venv/bin/python}
command -v "$PY" >/dev/null 2>&1 || PY=python3
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ls .whl-f/*.whl >/dev/null 2>&1; then
  if ! python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl-f/*.whl; then
    echo "gpu_check: installing the carried wheels failed; nothing measured" >&2
    exit 1
  fi
  export PYTHONPATH=/tmp/site:$PYTHONPATH
  PY=python3
fi
export PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
W=$(mktemp -d)
export FEDMOCO_CACHE_DIR="$W/.cache"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$W/gpu.txt"
pack() { tar czf "$OUT/gpu_check.tgz" --exclude=.cache -C "$W" . ; }
run() {  # name, timeout seconds, command...
  local name=$1 limit=$2 left=$((DEADLINE - SECONDS)); shift 2
  case " ${ONLY:-$name} " in *" $name "*) ;; *) return ;; esac
  if [ "$left" -lt 20 ]; then
    echo "rc=skipped $name (no time left of BUDGET_S)" | tee -a "$OUT/rc.txt"
    return
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo "== $name (at most ${limit} s)"
  timeout -k 10 "$limit" "$@" > "$W/$name.log" 2>&1
  echo "rc=$? $name" | tee -a "$OUT/rc.txt"
  tail -n 12 "$W/$name.log"
  grep -E '^\{.*\}$' "$W/$name.log" | tail -1 | tee -a "$OUT/gpu_check.jsonl"
  pack
}
# First the leak guard's cost (issue 11.3); its last row is split BN as one compiled normalisation
# per layer in channels_last ("compiled norm": Triton kernels compiled in its warm-up steps).
run moco_step 220 "$PY" benchmarks/moco_step.py --device cuda --image-size 224 --batch-size 256 --steps 15 \
  --out "$W/moco_step_gpu.md"
run feed_satellite 200 "$PY" benchmarks/feed_satellite.py --device cuda --quick --warm-only --workers 12 \
  --out "$W/feed_satellite_gpu.md"
run feed_medical 100 "$PY" benchmarks/feed_medical.py --device cuda --quick --workers 12 --out "$W/feed_medical_gpu.md"
run views_cuda_vs_cpu 60 "$PY" benchmarks/views_device_check.py --out "$W/views_device_check_gpu.md"
# a user's journey through the CLI on CUDA (benchmarks/cli_device_check.sh, both domains): the
# feed benchmarks drive the Trainer, not the commands around it. Its data and checkpoints go
# outside $W: the archive that comes back must stay small.
run cli_cuda 240 env PYTHON="$PY" bash benchmarks/cli_device_check.sh cuda "$(mktemp -d)"
# Last: split BN (NCHW, channels_last) and plain BN with torch.compile'd encoders (issue 11's
# option for a cheaper leak guard). On 2026-11-29 it printed no row within 240 s.
run moco_step_compiled 360 "$PY" benchmarks/moco_step.py --device cuda --image-size 224 --batch-size 256 --steps 15 \
  --compile --only torch.compile --out "$W/moco_step_compiled.md"
