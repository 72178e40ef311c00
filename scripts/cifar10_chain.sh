#!/usr/bin/env bash
# The original README's CIFAR-10 recipe for one architecture, end to end:
#   quantized ANNs 32 -> 4 -> 3 -> 2 bits (each stage initialised from the previous best checkpoint),
#   SNN evaluation of the 3-bit (T=7) and 2-bit (T=3) ANNs with signed and unsigned IF neurons,
#   layer-wise fine-tuning of the 2-bit SNN (signed, --force).
#
# usage: bash scripts/cifar10_chain.sh ARCH [--out DIR] [extra args passed to every script]
#        bash scripts/cifar10_chain.sh --help
#   ARCH         alex | vgg11 | resnet20 | resnet32 | resnet44 | resnet56 | resnet110 | resnet18
#   --out DIR    output root (default: $OUT, else result): every stage writes to and initialises from
#                DIR/<arch>_<bit>bit (DIR/<dataset>/<arch>_<bit>bit with --dataset other than cifar10)
#                -- the one place the output folder is decided
#   extra args   flags all three scripts accept, e.g. -id 0 --data DIR -b 128 -j 4 --dataset cifar10
# env:   EPOCHS (ANN epochs per stage, default 300), FT_EPOCHS (snn_ft -n, default 1),
#        SEED (--seed of the training and fine-tuning stages; default unseeded),
#        OUT (output root when --out is not given, default result), PYTHON (default .venv/bin/python),
#        DRY=1 (print the commands, run nothing)
# Runs from the repository root (so --data defaults to ./data). Every training stage uses --resume auto,
# and an evaluation or fine-tuning whose output exists is skipped: rerunning the chain after a crash
# continues where it stopped (scripts/lib/chain.sh).
set -euo pipefail
usage() { sed -n '7,18p' "$0" | sed 's/^# \{0,1\}//'; }
if [ $# -eq 0 ]; then
  echo "error: no ARCH given — usage: bash scripts/cifar10_chain.sh ARCH [--out DIR] [extra args] (--help for more)" >&2
  exit 2
fi
case "$1" in
  -h|--help) usage; exit 0;;
  -*) echo "error: the first argument must be the ARCH, not '$1' — e.g. bash scripts/cifar10_chain.sh alex $*" >&2
      exit 2;;
esac
ARCH=$1
shift
OUT=${OUT:-result}
EXTRA=()
DATASET=""
CT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] || { echo "error: --out needs a folder — pass --out DIR" >&2; exit 2; }
           OUT=$2; shift 2;;
    --out=*) OUT=${1#--out=}; shift;;
    -h|--help) usage; exit 0;;
    --dataset|-ct|--cifar-type)
           [ $# -ge 2 ] || { echo "error: $1 needs a value — see --help" >&2; exit 2; }
           if [ "$1" = --dataset ]; then DATASET=$2; else CT=$2; fi
           EXTRA+=("$1" "$2"); shift 2;;
    --dataset=*) DATASET=${1#--dataset=}; EXTRA+=("$1"); shift;;
    *) EXTRA+=("$1"); shift;;
  esac
done
# the run folders' dataset namespace, as classification/cifar10/task.py names them
DATASET=${DATASET:-cifar10}
[ "${CT:-10}" = 100 ] && [ "$DATASET" = cifar10 ] && DATASET=cifar100
NS=""
[ "$DATASET" != cifar10 ] && NS="$DATASET/"
cd "$(dirname "$0")/.."
. scripts/lib/chain.sh
EPOCHS=${EPOCHS:-300}
FT_EPOCHS=${FT_EPOCHS:-1}
SEED_ARGS=()
[ -n "${SEED:-}" ] && SEED_ARGS=(--seed "$SEED")
S=classification/cifar10

run() { chain_run "$PY" "$@"; }
rdir() { echo "$OUT/$NS${ARCH}_$1bit$2"; }
best() { echo "$(rdir "$1" "")/model_best.pth.tar"; }
train() {  # BIT WD LR [INIT_BIT]
  local bit=$1 wd=$2 lr=$3 init=$4
  run $S/main.py --arch "$ARCH" --bit "$bit" --wd "$wd" --lr "$lr" --epochs "$EPOCHS" --out "$OUT" \
    --resume auto ${init:+--init "$(best "$init")"} ${SEED_ARGS[@]+"${SEED_ARGS[@]}"} ${EXTRA[@]+"${EXTRA[@]}"}
}

train 32 5e-4 0.1 ""
train 4 1e-4 4e-2 32
train 3 1e-4 4e-2 4
train 2 3e-5 4e-2 3
for BIT in 3 2; do
  T=$(( (1 << BIT) - 1 ))
  for NEURON in signed unsigned; do
    U=(); [ "$NEURON" = unsigned ] && U=(-u)
    js="$(rdir "$BIT" "")/metrics_snn_${NEURON}_T${T}.json"
    chain_step "$js" "$PY" $S/snn.py --arch "$ARCH" --bit "$BIT" -e ${U[@]+"${U[@]}"} --init "$(best "$BIT")" --out "$OUT" \
      --metrics-out "$js" ${EXTRA[@]+"${EXTRA[@]}"}
  done
done
chain_step "$(rdir 2 _ft)/model_best.pth.tar" "$PY" $S/snn_ft.py --arch "$ARCH" --bit 2 -n "$FT_EPOCHS" --force \
  --init "$(best 2)" --out "$OUT" ${SEED_ARGS[@]+"${SEED_ARGS[@]}"} ${EXTRA[@]+"${EXTRA[@]}"}
chain_done "chain done: metrics JSONs in $OUT/$NS${ARCH}_{32,4,3,2}bit/ and $OUT/$NS${ARCH}_2bit_ft/"
