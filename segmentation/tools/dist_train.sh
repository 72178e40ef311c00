#!/usr/bin/env bash
# The original's (vedaseg's) training command, run from segmentation/ (or anywhere):
#   bash tools/dist_train.sh CONFIG "GPU_IDS" [extra train.py flags]
# CONFIG: a preset name or path (voc_deeplabv1_2bit, configs/voc_deeplabv1_2bit.py / .json);
# GPU_IDS: e.g. "0,1,2,3" -- one process per id (torchrun; CPU processes with gloo when there is no GPU).
set -euo pipefail
CONFIG=${1:?usage: bash tools/dist_train.sh CONFIG "GPU_IDS" [extra train.py flags]}
GPUS=${2:-0}
shift $(( $# >= 2 ? 2 : 1 ))
HERE="$(cd "$(dirname "$0")/.." && pwd)"
ROOT="$(dirname "$HERE")"
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3
N=$(echo "$GPUS" | tr ',' '\n' | grep -c .)
export CUDA_VISIBLE_DEVICES="$GPUS"
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node="$N" "$HERE/train.py" --config "$CONFIG" "$@"
