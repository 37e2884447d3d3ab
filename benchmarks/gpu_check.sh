#!/usr/bin/env bash
# The CUDA checks of issue 11 on a lent GPU, in about 4 minutes (8 with the last, compiled step): the MoCo step with each
# normalisation against lightly (leak-guard cost), the medical and satellite feeds against the
# step, and batched views on CUDA against the same views on the CPU.
#   OUT=/some/folder bash benchmarks/gpu_check.sh
# Results: $OUT/*.md and $OUT/gpu_check.jsonl (one JSON line per benchmark).
# The lent machines have torch but not monai/pydicom/rasterio/lightly: carry them as wheels
# in .whl-f (see docs/engine.md, "Checking the CUDA path"); they are installed here if present.
set -u
if ls .whl-f/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl-f/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD PYTHON=python3
fi
export PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
export FEDMOCO_CACHE_DIR="$OUT/.cache"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
run() {  # name, timeout seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "rc=$? $name" | tee -a "$OUT/rc.txt"
  grep -E '^\{.*\}$' "$OUT/$name.log" | tail -1 | tee -a "$OUT/gpu_check.jsonl"
}
run moco_step 150 "$PY" benchmarks/moco_step.py --device cuda --image-size 224 --batch-size 256 --steps 15 \
  --out "$OUT/moco_step_gpu.md"
run views_cuda_vs_cpu 60 "$PY" benchmarks/views_device_check.py --out "$OUT/views_device_check_gpu.md"
run feed_medical 120 "$PY" benchmarks/feed_medical.py --device cuda --quick --workers 12 --out "$OUT/feed_medical_gpu.md"
run feed_satellite 120 "$PY" benchmarks/feed_satellite.py --device cuda --quick --warm-only --workers 12 \
  --out "$OUT/feed_satellite_gpu.md"
# Last, as it may run out of time: split BN (NCHW, then channels_last) and plain BN with
# torch.compile'd encoders (issue 11's option for a cheaper leak guard; compiling takes minutes,
# and each row is printed to the log as soon as it is measured).
run moco_step_compiled 360 "$PY" benchmarks/moco_step.py --device cuda --image-size 224 --batch-size 256 --steps 15 \
  --compile --only torch.compile --out "$OUT/moco_step_compiled.md"
