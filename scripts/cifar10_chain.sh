#!/usr/bin/env bash
# The seed README's CIFAR-10 recipe for one architecture, end to end (spec 3.1):
#   quantized ANNs 32 -> 4 -> 3 -> 2 bits (each stage initialised from the previous best checkpoint),
#   SNN evaluation of the 3-bit (T=7) and 2-bit (T=3) ANNs with signed and unsigned IF neurons,
#   layer-wise fine-tuning of the 2-bit SNN (signed, --force).
#
# usage: bash scripts/cifar10_chain.sh ARCH [extra args passed to every script, e.g. -id 0 --data DIR]
# env:   EPOCHS (ANN epochs per stage, default 300), FT_EPOCHS (snn_ft -n, default 1),
#        OUT (output root, default result), PYTHON (default .venv/bin/python)
# Runs from the repository root (so --data defaults to ./data). Every training stage uses
# --resume auto: rerunning the chain after a crash continues where it stopped.
set -euo pipefail
ARCH=${1:?usage: bash scripts/cifar10_chain.sh ARCH [extra args]}
shift
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
EPOCHS=${EPOCHS:-300}
FT_EPOCHS=${FT_EPOCHS:-1}
OUT=${OUT:-result}
S=classification/cifar10

run() { echo "+ python $*" >&2; "$PY" "$@"; }
best() { echo "$OUT/${ARCH}_$1bit/model_best.pth.tar"; }
train() {  # BIT WD LR [INIT_BIT] [extra...]
  local bit=$1 wd=$2 lr=$3 init=$4; shift 4
  run $S/main.py --arch "$ARCH" --bit "$bit" --wd "$wd" --lr "$lr" --epochs "$EPOCHS" --out "$OUT" \
    --resume auto ${init:+--init "$(best "$init")"} "$@"
}

train 32 5e-4 0.1 "" "$@"
train 4 1e-4 4e-2 32 "$@"
train 3 1e-4 4e-2 4 "$@"
train 2 3e-5 4e-2 3 "$@"
for BIT in 3 2; do
  run $S/snn.py --arch "$ARCH" --bit "$BIT" -e --init "$(best "$BIT")" --out "$OUT" "$@"
  run $S/snn.py --arch "$ARCH" --bit "$BIT" -e -u --init "$(best "$BIT")" --out "$OUT" "$@"
done
run $S/snn_ft.py --arch "$ARCH" --bit 2 -n "$FT_EPOCHS" --force --init "$(best 2)" --out "$OUT" "$@"
echo "chain done: metrics JSONs in $OUT/${ARCH}_{32,4,3,2}bit/ and $OUT/${ARCH}_2bit_ft/" >&2
