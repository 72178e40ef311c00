#!/usr/bin/env bash
# The ImageNet recipe of the original README, end to end, on N GPUs via torchrun:
#
#   32-bit start -> 4-bit -> 3-bit -> 2-bit quantized ANNs (each initialised from the previous best),
#   SNN evaluation of the 3- and 2-bit models with unsigned and signed IF neurons (T = 7 / 3),
#   layer-wise fine-tuning of those SNNs (signed), written to result/imagenet/<arch>_<bit>bit_ft/.
#
# usage: scripts/imagenet_chain.sh [-a ARCH] DATA [NGPU]
#   ARCH   as the ARCH variable below (-a wins)
#   DATA   ImageNet root holding train/ and val/ (ImageFolder trees)
#   NGPU   processes (default: the number of GPUs, at least 1); -b is per process, as in the original
#
# Environment (defaults = the README's commands, 4 GPUs x 256):
#   ARCH=alexnet        alexnet | vgg16 | vgg11 | resnet18 | resnet34, or a torchvision classification
#                       model with ReLU / ReLU6 activations (mobilenet_v2, resnet50, ...; docs/own-network.md)
#   START=auto          the 32-bit start: auto = OUT/imagenet/<arch>_32bit/model_best.pth.tar if present, else
#                       torchvision's weights for resnet18/34 (--pretrained), else train a 32-bit model
#                       here; or train | torchvision | none (4-bit from random weights, as the original
#                       code actually did) | a local state-dict FILE
#   EPOCHS=60  BATCH=256  FT_BATCH=128  WORKERS=4  OUT=result
#   LR32=0.1  LR4=0.025  LR_LOW=0.0025     (README: --lr=0.025 at 4 bits, 0.0025 at 3 and 2 bits)
#   SNN_BITS="3 2"      bit-widths converted, evaluated and fine-tuned
#   FT_EPOCHS=1         -n epochs per layer
#   FT_FLAGS=""         e.g. "--force" or "--score-batches 500" (without them every tuned layer is
#                       judged on a full pass over the training set, as in the original)
#   EXTRA="--dali_cpu"  flags added to every command (e.g. "--loader torch", "--input-size 224")
#   PY=.venv/bin/python (or python3)   DRY=1: print the commands, run nothing
#
# Every training stage runs with --resume auto, and an evaluation or fine-tuning whose output exists is
# skipped: rerunning the chain continues a killed run (scripts/lib/chain.sh).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
if [ $# -ge 2 ] && { [ "$1" = -a ] || [ "$1" = --arch ]; }; then ARCH=$2; shift 2; fi
if [ $# -lt 1 ] || [ $# -gt 2 ]; then
  echo "usage: $0 DATA [NGPU]   (see the comments at the top of $0 for the environment variables)" >&2
  exit 2
fi
DATA=$1
if [ $# -ge 2 ]; then
  NGPU=$2
else
  NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "${NGPU:-0}" -ge 1 ] 2>/dev/null || NGPU=1
fi
case "$NGPU" in ''|*[!0-9]*|0) echo "error: NGPU must be a positive integer, got '$NGPU'" >&2; exit 2;; esac
if [ "${DRY:-0}" != 1 ] && [ ! -d "$DATA" ]; then
  echo "error: data directory not found: $DATA — pass the ImageNet root holding train/ and val/" >&2
  exit 2
fi

ARCH=${ARCH:-alexnet}
START=${START:-auto}
EPOCHS=${EPOCHS:-60}
BATCH=${BATCH:-256}
FT_BATCH=${FT_BATCH:-128}
WORKERS=${WORKERS:-4}
OUT=${OUT:-result}
LR32=${LR32:-0.1}
LR4=${LR4:-0.025}
LR_LOW=${LR_LOW:-0.0025}
SNN_BITS=${SNN_BITS:-3 2}
FT_EPOCHS=${FT_EPOCHS:-1}
FT_FLAGS=${FT_FLAGS:-}
EXTRA=${EXTRA---dali_cpu}
if [ -z "${PY:-}" ]; then
  if [ -x "$here/.venv/bin/python" ]; then PY="$here/.venv/bin/python"; else PY=python3; fi
fi
S="$here/classification/imagenet"
# shellcheck source=lib/chain.sh
. "$here/scripts/lib/chain.sh"
LAUNCH=("$PY" -m torch.distributed.run --standalone --nproc_per_node="$NGPU")

run() { chain_run "$@"; }

common=(-a "$ARCH" --workers "$WORKERS" --out "$OUT")
# shellcheck disable=SC2206  # EXTRA / FT_FLAGS are flag lists, split on purpose
extra=($EXTRA)
# shellcheck disable=SC2206
ft_flags=($FT_FLAGS)

rdir() { echo "$OUT/imagenet/${ARCH}_$1bit$2"; }  # ImageNet runs: OUT/imagenet/
best() { echo "$(rdir "$1" "")/model_best.pth.tar"; }

# ---------------------------------------------------------------- 32-bit start
init4=()
case "$START" in
  auto)
    if [ -f "$(best 32)" ]; then
      init4=(--init "$(best 32)")
    elif [ "$ARCH" = resnet18 ] || [ "$ARCH" = resnet34 ]; then
      init4=(--pretrained torchvision)
    else
      START=train
    fi;;
  torchvision) init4=(--pretrained torchvision);;
  none) ;;
  train) ;;
  *) init4=(--pretrained "$START");;
esac
if [ "$START" = train ]; then
  run "${LAUNCH[@]}" "$S/dali_main.py" "${common[@]}" -b "$BATCH" --bit 32 --lr="$LR32" --epochs "$EPOCHS" \
      --resume auto "${extra[@]}" "$DATA"
  init4=(--init "$(best 32)")
fi

# ---------------------------------------------------------------- 4 -> 3 -> 2 bits
run "${LAUNCH[@]}" "$S/dali_main.py" "${common[@]}" -b "$BATCH" --bit 4 "${init4[@]}" --lr="$LR4" \
    --epochs "$EPOCHS" --resume auto "${extra[@]}" "$DATA"
run "${LAUNCH[@]}" "$S/dali_main.py" "${common[@]}" -b "$BATCH" --bit 3 --init "$(best 4)" --lr="$LR_LOW" \
    --epochs "$EPOCHS" --resume auto "${extra[@]}" "$DATA"
run "${LAUNCH[@]}" "$S/dali_main.py" "${common[@]}" -b "$BATCH" --bit 2 --init "$(best 3)" --lr="$LR_LOW" \
    --epochs "$EPOCHS" --resume auto "${extra[@]}" "$DATA"

# ---------------------------------------------------------------- SNN: unsigned and signed IF neurons
for b in $SNN_BITS; do
  T=$(( (1 << b) - 1 ))
  js="$(rdir "$b" "")/metrics_snn_unsigned_T$T.json"
  chain_step "$js" "${LAUNCH[@]}" "$S/snn.py" "${common[@]}" -b "$BATCH" -e -u --bit "$b" --init "$(best "$b")" \
      --metrics-out "$js" "${extra[@]}" "$DATA"
  js="$(rdir "$b" "")/metrics_snn_signed_T$T.json"
  chain_step "$js" "${LAUNCH[@]}" "$S/snn.py" "${common[@]}" -b "$BATCH" -e --bit "$b" --init "$(best "$b")" \
      --metrics-out "$js" "${extra[@]}" "$DATA"
done

# ---------------------------------------------------------------- layer-wise fine-tuning (signed)
for b in $SNN_BITS; do
  chain_step "$(rdir "$b" _ft)/model_best.pth.tar" "${LAUNCH[@]}" "$S/snn_ft.py" "${common[@]}" -b "$FT_BATCH" \
      --bit "$b" --init "$(best "$b")" -n "$FT_EPOCHS" ${ft_flags[@]+"${ft_flags[@]}"} "${extra[@]}" "$DATA"
done

chain_done "done: ANN checkpoints in $OUT/imagenet/${ARCH}_{4,3,2}bit/, SNN metrics (metrics_snn_*.json) beside them," \
     "fine-tuned SNNs in $OUT/imagenet/${ARCH}_<bit>bit_ft/"
