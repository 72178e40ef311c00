#!/usr/bin/env bash
# The original README's detection recipe for one version, end to end:
#   quantized YOLOv2 32 -> 4 -> 3 -> 2 bits (each stage --init from the previous best checkpoint),
#   SNN evaluation of the 4 / 3 / 2-bit detectors (T = 15 / 7 / 3) with signed and unsigned IF neurons,
#   layer-wise fine-tuning of the 3- and 2-bit SNNs (signed; evaluated after tuning).
#
# usage: bash scripts/detection_chain.sh [VERSION] [extra args passed to every script, e.g. -root DIR]
#        VERSION: yolov2_tiny (default) or yolov2_r34
#        -d / --dataset among the extra args (voc | coco) sets the dataset of every step and run folder
#        (eval.py gets coco-val for coco); it overrides DATASET
# env:   DATASET (voc | coco, default voc), EPOCHS (per stage, default 250), BS (per process, default 4),
#        NPROC (processes, default 1; >1 runs torch.distributed.run like the README's 4-GPU launch),
#        TRAIN_FLAGS (default "-ms --ema --sybn"; set but empty: none), FT_BITS (default "3 2"; set but
#        empty: no fine-tuning), FT_EPOCHS (snn_ft -n, default 1),
#        OUT (save folder, default weights/), PYTHON (default .venv/bin/python),
#        TRAIN_ARGS / EVAL_ARGS / FT_ARGS: extra flags for train.py / eval.py / snn_ft.py only
#        (e.g. TRAIN_ARGS="--train_size 320 --val_size 320 --width 0.5" EVAL_ARGS="-size 320"),
#        PRETRAIN=1 (first pretrain the backbone on the box crops of the data, detection/pretrain.py, and
#        start the 32-bit stage --init from it; PRETRAIN_ARGS: its extra flags, e.g. "--epochs 20"; it gets
#        the data / --width / --seed / workers flags of the extra args),
#        DRY=1 (print the commands, run nothing)
# Every training stage uses --resume auto, and an evaluation or fine-tuning whose output exists is skipped:
# rerunning the chain after a crash continues where it stopped (scripts/lib/chain.sh).
set -euo pipefail
VERSION=yolov2_tiny
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then VERSION=$1; shift; fi   # a first argument that is a flag: the default version
cd "$(dirname "$0")/.."
. scripts/lib/chain.sh
chain_take "-d --dataset" "$@"
DATASET=${CHAIN_TAKEN:-${DATASET:-voc}}
set -- ${CHAIN_REST[@]+"${CHAIN_REST[@]}"}
case "$DATASET" in
  voc | coco) ;;
  *) echo "detection_chain.sh: unknown dataset '$DATASET' -- use -d voc or -d coco (or DATASET=voc / coco)" >&2
     exit 2 ;;
esac
EPOCHS=${EPOCHS:-250}
BS=${BS:-4}
NPROC=${NPROC:-1}
TRAIN_FLAGS=${TRAIN_FLAGS--ms --ema --sybn}  # an empty TRAIN_FLAGS / FT_BITS means none
FT_BITS=${FT_BITS-3 2}
FT_EPOCHS=${FT_EPOCHS:-1}
OUT=${OUT:-weights}
D=detection
EVAL_SET=$DATASET; [ "$DATASET" = coco ] && EVAL_SET=coco-val

# shellcheck disable=SC2046  # the launcher is split into words on purpose
run() { chain_run $(chain_launcher) "$@"; }
rdir() { echo "$OUT/$DATASET/${VERSION}_$1bit$2"; }
best() { echo "$(rdir "$1" "")/model_best.pth.tar"; }
train() {  # BIT [INIT_CHECKPOINT] [extra...]
  local bit=$1 init=$2; shift 2
  # shellcheck disable=SC2086
  run $D/train.py -d "$DATASET" -v "$VERSION" $TRAIN_FLAGS --batch_size "$BS" --bit "$bit" --epochs "$EPOCHS" \
    --save_folder "$OUT" --resume auto ${init:+--init "$init"} ${TRAIN_ARGS:-} "$@"
}

chain_pretrain "$OUT/$DATASET/${VERSION}_pretrain" "-root --root --data_root --data-root --classes --width --seed -j --workers --num_workers --num-workers" \
  "$PY" -m $D.pretrain -d "$DATASET" -v "$VERSION" --save_folder "$OUT" -- "$@"
train 32 "$CHAIN_INIT" "$@"
train 4 "$(best 32)" "$@"
train 3 "$(best 4)" "$@"
train 2 "$(best 3)" "$@"
for BIT in 4 3 2; do
  T=$(( (1 << BIT) - 1 ))
  for NEURON in signed unsigned; do
    U=""; [ "$NEURON" = unsigned ] && U=-u
    js="$(rdir "$BIT" "")/metrics_snn_${NEURON}_T${T}.json"
    # shellcheck disable=SC2046,SC2086
    chain_step "$js" $(chain_launcher) $D/eval.py -d "$EVAL_SET" -v "$VERSION" --bit "$BIT" --spike $U --init "$(best "$BIT")" \
      --save_folder "$OUT" --metrics-out "$js" ${EVAL_ARGS:-} "$@"
  done
done
for BIT in $FT_BITS; do
  # shellcheck disable=SC2046,SC2086
  chain_step "$(rdir "$BIT" _ft)/model_best.pth.tar" $(chain_launcher) $D/snn_ft.py -d "$DATASET" -v "$VERSION" --bit "$BIT" \
    -n "$FT_EPOCHS" --init "$(best "$BIT")" --save_folder "$OUT" ${FT_ARGS:-} "$@"
done
FT_DIRS=""; [ -n "${FT_BITS// /}" ] && FT_DIRS=" and ${VERSION}_{${FT_BITS// /,}}bit_ft/"
chain_done "chain done: metrics JSONs in $OUT/$DATASET/${VERSION}_{32,4,3,2}bit/$FT_DIRS"
