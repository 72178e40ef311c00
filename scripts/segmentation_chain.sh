#!/usr/bin/env bash
# The original's segmentation recipe for one model, end to end:
#   quantized ANNs 32 -> 4 -> 3 -> 2 bits (each stage --init from the previous stage's best mIoU checkpoint),
#   SNN evaluation of the 4 / 3 / 2-bit ANNs at T = 15 / 7 / 3 with signed and unsigned IF neurons,
#   layer-wise fine-tuning of the 2-bit SNN (signed) and its evaluation.
#
# usage: bash scripts/segmentation_chain.sh MODEL [extra args for every script, e.g. -d coco --data_root DIR -id 0]
#        MODEL: deeplabv1_vgg9 | deeplabv3_r34
# env:   EPOCHS (ANN epochs per stage, default 50), FT_EPOCHS (snn_ft -n, default 1), FT_ARGS (extra snn_ft
#        flags, default --force; set but empty: none), INIT32 (--init of the 32-bit stage: a backbone file or 'torchvision';
#        default none), PRETRAIN=1 (first pretrain the backbone on the objects of the masks,
#        segmentation/pretrain.py, and start the 32-bit stage --init from it instead of INIT32; PRETRAIN_ARGS:
#        its extra flags, e.g. "--epochs 20"; it gets the data / --width / --seed / workers flags of the extra
#        args), SAVE (--save_folder, default weights), NPROC (processes per stage via torchrun,
#        default 1), PYTHON (default .venv/bin/python), DRY=1 (print the commands, run nothing)
# Every training stage uses --resume auto, and an evaluation or fine-tuning whose output exists is skipped:
# rerunning the chain after a crash continues where it stopped (scripts/lib/chain.sh).
set -euo pipefail
MODEL=${1:?usage: bash scripts/segmentation_chain.sh MODEL [extra args]}
shift
cd "$(dirname "$0")/.."
. scripts/lib/chain.sh
EPOCHS=${EPOCHS:-50}
FT_EPOCHS=${FT_EPOCHS:-1}
FT_ARGS=${FT_ARGS---force}  # an empty FT_ARGS means no extra flags
SAVE=${SAVE:-weights}
NPROC=${NPROC:-1}
INIT32=${INIT32:-}
S=segmentation
# the dataset (for the run folders): -d / --dataset among the extra args (any form: -d X, -dX, --dataset=X),
# default voc; the steps get it from the extra args
chain_take "-d --dataset" "$@"
DS=${CHAIN_TAKEN:-voc}

# shellcheck disable=SC2046  # the launcher is split into words on purpose
run() { chain_run $(chain_launcher) "$@"; }
run_dir() { echo "$SAVE/$DS/${MODEL}_$1bit$2"; }
best() { echo "$(run_dir "$1" "")/model_best.pth.tar"; }
train() {  # BIT INIT
  local bit=$1 init=$2
  shift 2
  run $S/train.py -m "$MODEL" --bit "$bit" --epochs "$EPOCHS" --save_folder "$SAVE" --resume auto \
    ${init:+--init "$init"} "$@"
}
snn_eval() {  # BIT [-u] : metrics JSON in the run folder; skipped when it exists
  local bit=$1 flag=${2:-} neuron=signed T=$(( (1 << $1) - 1 ))
  shift 2
  [ -n "$flag" ] && neuron=unsigned
  local js; js="$(run_dir "$bit" "")/metrics_snn_${neuron}_T${T}.json"
  # shellcheck disable=SC2046
  chain_step "$js" $(chain_launcher) $S/eval.py -m "$MODEL" --bit "$bit" --spike $flag --init "$(best "$bit")" --save_folder "$SAVE" \
    --metrics-out "$js" --plot "$@"
}

chain_pretrain "$SAVE/$DS/${MODEL}_pretrain" "-d --dataset -root --data_root --data-root --classes --mask_cache --mask-cache --width --seed -j --workers --num_workers" \
  "$PY" -m $S.pretrain -m "$MODEL" --save_folder "$SAVE" -- "$@"
train 32 "${CHAIN_INIT:-$INIT32}" "$@"
train 4 "$(best 32)" "$@"
train 3 "$(best 4)" "$@"
train 2 "$(best 3)" "$@"
for BIT in 4 3 2; do
  snn_eval "$BIT" "" "$@"
  snn_eval "$BIT" -u "$@"
done
# shellcheck disable=SC2046,SC2086
chain_step "$(run_dir 2 _ft)/model_best.pth.tar" $(chain_launcher) $S/snn_ft.py -m "$MODEL" --bit 2 -n "$FT_EPOCHS" $FT_ARGS \
  --init "$(best 2)" --save_folder "$SAVE" "$@"
chain_done "chain done: metrics JSONs in $SAVE/$DS/${MODEL}_{32,4,3,2}bit/ and $SAVE/$DS/${MODEL}_2bit_ft/"
