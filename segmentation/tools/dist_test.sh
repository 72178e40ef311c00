#!/usr/bin/env bash
# The original's (vedaseg's) test command, run from segmentation/ (or anywhere):
#   bash tools/dist_test.sh CONFIG CHECKPOINT "GPU_IDS" [extra eval.py flags]
# CONFIG: a preset name or path (voc_deeplabv1_T3 evaluates the SNN, voc_deeplabv1_2bit the ANN);
# CHECKPOINT: the model_best.pth.tar to evaluate; GPU_IDS: one process per id (torchrun).
set -euo pipefail
CONFIG=${1:?usage: bash tools/dist_test.sh CONFIG CHECKPOINT "GPU_IDS" [extra eval.py flags]}
CKPT=${2:?usage: bash tools/dist_test.sh CONFIG CHECKPOINT "GPU_IDS" [extra eval.py flags]}
GPUS=${3:-0}
shift $(( $# >= 3 ? 3 : 2 ))
HERE="$(cd "$(dirname "$0")/.." && pwd)"
ROOT="$(dirname "$HERE")"
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3
N=$(echo "$GPUS" | tr ',' '\n' | grep -c .)
export CUDA_VISIBLE_DEVICES="$GPUS"
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node="$N" "$HERE/eval.py" --config "$CONFIG" --init "$CKPT" "$@"
