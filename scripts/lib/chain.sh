# Sourced by the scripts/*_chain.sh recipes: one rule for printing, dry runs and finished steps.
#
#   DRY=1               print every command, run nothing (no folder or file is created)
#   chain_run CMD...    print "+ CMD" on stderr ($PY shown as "python"), then run it (not with DRY=1)
#   chain_step OUT CMD  run CMD unless OUT exists: an evaluation's metrics JSON or a fine-tuning's final
#                       checkpoint is written once, at the end, so its presence means the step finished;
#                       the step is then reported as "skip (done): OUT"
#   chain_pick FLAGS ARGS  keep the pairs of ARGS whose flag is in FLAGS (in CHAIN_PICKED): the extra args a
#                       chain passes to every script, cut to those a script with fewer flags takes
#   chain_take FLAGS ARGS  the value of the last of FLAGS in ARGS (CHAIN_TAKEN, empty if none) and ARGS
#                       without those flags (CHAIN_REST): e.g. the dataset, which a chain passes on itself
#   A flag is read in every form argparse takes: "FLAG VALUE", "FLAG=VALUE", and "-xVALUE" for a one-letter
#   flag (-j0).
#   chain_pretrain DIR FLAGS CMD... -- ARGS
#                       with PRETRAIN=1: run CMD + the FLAGS pairs of ARGS + $PRETRAIN_ARGS unless
#                       DIR/metrics_pretrain.json exists (a backbone pretraining writes it when it ends), and set
#                       CHAIN_INIT=DIR/model_best.pth.tar; without PRETRAIN=1: CHAIN_INIT is empty
#
# Training stages are not skipped: they always run with --resume auto, so a killed stage continues and a
# finished one returns at once (and a larger EPOCHS extends it).
#
# PY: the interpreter of the steps -- $PY or $PYTHON if set, else .venv/bin/python (relative to the
# repository root, the working directory of the chains that source this), else python3.

PY=${PY:-${PYTHON:-.venv/bin/python}}
[ -x "$PY" ] || PY=python3

chain_run() {
  local shown=("$@")
  [ "${1:-}" = "${PY:-}" ] && shown[0]=python  # the interpreter, whatever its path, reads as "python"
  echo "+ ${shown[*]}" >&2
  if [ "${DRY:-0}" != 1 ]; then "$@"; fi
}

chain_step() {
  local out=$1
  shift
  if [ -e "$out" ]; then
    echo "skip (done): $out" >&2
    return 0
  fi
  chain_run "$@"
}

chain_done() {  # MESSAGE: the closing line, not printed by a dry run
  if [ "${DRY:-0}" != 1 ]; then echo "$*" >&2; fi
}

chain_launcher() {  # the interpreter, or torch.distributed.run with NPROC processes when NPROC > 1
  if [ "${NPROC:-1}" -gt 1 ]; then echo "$PY -m torch.distributed.run --nproc_per_node=$NPROC"; else echo "$PY"; fi
}

_chain_match() {  # "FLAG ..." ARG [NEXT]: CHAIN_N = words of a flag among FLAGS (0: none), CHAIN_V = its value
  local flags=" $1 " a=$2
  CHAIN_N=0
  CHAIN_V=""
  if [[ "$a" == -*=* ]]; then
    if [[ "$flags" == *" ${a%%=*} "* ]]; then CHAIN_N=1; CHAIN_V=${a#*=}; fi
  elif [[ "$flags" == *" $a "* ]]; then
    if [ $# -gt 2 ]; then CHAIN_N=2; CHAIN_V=$3; fi
  elif [[ "$a" == -[!-]?* ]] && [[ "$flags" == *" ${a:0:2} "* ]]; then
    CHAIN_N=1; CHAIN_V=${a:2}
  fi
}

chain_pick() {  # "FLAG FLAG ..." ARGS...: CHAIN_PICKED = the flags of ARGS among these, with their values
  local flags=$1
  shift
  CHAIN_PICKED=()
  while [ $# -gt 0 ]; do
    _chain_match "$flags" "$@"
    if [ "$CHAIN_N" -gt 0 ]; then CHAIN_PICKED+=("${@:1:$CHAIN_N}"); shift "$CHAIN_N"; else shift; fi
  done
}

chain_take() {  # "FLAG ..." ARGS...: CHAIN_TAKEN = the last of these flags' value, CHAIN_REST = ARGS without them
  local flags=$1
  shift
  CHAIN_TAKEN=""
  CHAIN_REST=()
  while [ $# -gt 0 ]; do
    _chain_match "$flags" "$@"
    if [ "$CHAIN_N" -gt 0 ]; then CHAIN_TAKEN=$CHAIN_V; shift "$CHAIN_N"; else CHAIN_REST+=("$1"); shift; fi
  done
}

chain_pretrain() {
  CHAIN_INIT=""
  [ "${PRETRAIN:-0}" = 1 ] || return 0
  local dir=$1 flags=$2 cmd=()
  shift 2
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do cmd+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  chain_pick "$flags" "$@"
  # shellcheck disable=SC2086  # PRETRAIN_ARGS is split into flags on purpose
  chain_step "$dir/metrics_pretrain.json" "${cmd[@]}" ${CHAIN_PICKED[@]+"${CHAIN_PICKED[@]}"} ${PRETRAIN_ARGS:-}
  CHAIN_INIT="$dir/model_best.pth.tar"
}
