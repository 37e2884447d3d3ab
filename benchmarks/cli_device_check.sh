#!/usr/bin/env bash
# fedmoco's user journey on one device, end to end through the CLI, per domain: demo data,
# pretrain begun on the CPU and resumed on the device (batched views, cache, checkpoints), the
# checkpoint opened without a GPU, kNN, linear probe, export, embed, fine-tune. For a lent GPU:
#   bash benchmarks/cli_device_check.sh cuda WORKDIR
# (benchmarks/gpu_check.sh runs it); `bash benchmarks/cli_device_check.sh cpu /tmp/x` is the
# same journey on the CPU. Exits non-zero at the first failing command, which it names.
set -u
DEVICE=${1:-cuda}
W=${2:?usage: cli_device_check.sh DEVICE WORKDIR}
PY=${PYTHON:-.venv/bin/python}
command -v "$PY" >/dev/null 2>&1 || PY=python3
ARCH=${ARCH:-resnet18}
step() {  # name, command...
  local name=$1; shift
  echo "== $name: $*"
  if ! "$@"; then echo "cli_device_check: FAILED at $name" >&2; exit 1; fi
}
mkdir -p "$W"
for domain in medical satellite; do
  d="$W/$domain"
  step "$domain demo data" "$PY" -m fedmoco.cli -q make-demo-data --domain "$domain" --out "$d/data"
  step "$domain labelled demo data" "$PY" -m fedmoco.cli -q make-demo-data --domain "$domain" --labelled --out "$d/labelled"
  # the first epoch on the CPU (a few steps), resumed on DEVICE: a run moved to a GPU machine
  step "$domain pretrain on the CPU" "$PY" -m fedmoco.cli -q pretrain --domain "$domain" --data "$d/data" \
    --out "$d/run" --device cpu --arch "$ARCH" --image-size 64 --batch-size 32 --epochs 1 --max-steps-per-epoch 2 \
    --workers 4 --no-plots
  step "$domain resume on $DEVICE" "$PY" -m fedmoco.cli -q pretrain --data "$d/data" --out "$d/run" --resume \
    --epochs 2 --device "$DEVICE" --workers 4 --no-plots
  step "$domain resume on $DEVICE again" "$PY" -m fedmoco.cli -q pretrain --data "$d/data" --out "$d/run" --resume \
    --epochs 3 --device "$DEVICE" --workers 4 --no-plots
  # a checkpoint made on the GPU opens where there is none, even without map_location
  step "$domain checkpoint without a GPU" env CUDA_VISIBLE_DEVICES= "$PY" -c \
    "import sys, torch; torch.load(sys.argv[1], weights_only=True)" "$d/run/checkpoint.pt"
  step "$domain knn" "$PY" -m fedmoco.cli -q knn --checkpoint "$d/run/checkpoint.pt" --data "$d/labelled" \
    --device "$DEVICE" --out "$d/knn" --k 5
  step "$domain linear probe" "$PY" -m fedmoco.cli -q linear-probe --checkpoint "$d/run/checkpoint.pt" \
    --data "$d/labelled" --device "$DEVICE" --out "$d/probe"
  step "$domain export" "$PY" -m fedmoco.cli -q export "$d/run/checkpoint.pt" --out "$d/export"
  step "$domain embed" "$PY" -m fedmoco.cli -q embed "$d/run/checkpoint.pt" --data "$d/labelled" --device "$DEVICE" \
    --out "$d/embeddings"
  step "$domain finetune" "$PY" -m fedmoco.cli -q finetune --checkpoint "$d/run/checkpoint.pt" --data "$d/labelled" \
    --device "$DEVICE" --out "$d/finetune" --epochs 2 --seeds 0
done
echo "cli_device_check: every step passed on $DEVICE"
