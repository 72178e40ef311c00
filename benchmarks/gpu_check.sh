#!/usr/bin/env bash
# Everything that needs a CUDA device, in one short run (< 10 minutes on one GPU):
#   1. the IF kernel bit-identity tests for every backend (reference, compile, cpp on the CPU side;
#      Triton and torch.compile on CUDA tensors, against the reference loop);
#   2. the CUDA path of classification/cifar10: main.py (2 iterations) then snn.py -e on a tiny fake CIFAR-10;
#   3. 1-GPU DDP with NCCL: the same snn.py under torchrun and under python -m torch.distributed.launch;
#   4. the DALI GPU pipeline: classification/imagenet/dali_main.py --loader dali (no --dali_cpu), tiny images;
#   5. the speed table on the GPU at T = 3 / 7 / 15 (benchmarks/snn_speed.py --device cuda, ResNet-20);
#   6. the dense models' speed table on the GPU (YOLOv2 tiny / R34 at 416, DeepLab v1 VGG-9 / v3 R34 at 513,
#      batch 1 and 4, T = 3 / 15).
# Usage:  bash benchmarks/gpu_check.sh            (PYTHON=... to choose the interpreter; GPU_CHECK_OUT=dir)
#         GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh   (no GPU: steps 5 and 6 only, on the CPU, tiny sizes:
#                                                              their commands run and write complete records)
# Prints [ok] / [FAIL] / [skip] per step and exits non-zero if a step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT=${GPU_CHECK_OUT:-$(mktemp -d /tmp/fastsnn_gpu_check.XXXXXX)}
mkdir -p "$OUT"
export PYTHONPATH="$ROOT:$ROOT/tests${PYTHONPATH:+:$PYTHONPATH}"
FAILED=()
STARTED=$(date +%s)
DEVICE=${GPU_CHECK_DEVICE:-cuda}
if [ "$DEVICE" != cuda ] && [ "$DEVICE" != cpu ]; then
  echo "error: GPU_CHECK_DEVICE=$DEVICE — use cuda (default) or cpu"; exit 2
fi

step() { echo; echo "=== [$(($(date +%s) - STARTED)) s] $*"; }
result() {  # name rc
  if [ "$2" -eq 0 ]; then echo "[ok] $1"; else echo "[FAIL] $1 (exit $2)"; FAILED+=("$1"); fi
}

check_records() {  # json file, expected number of records: every record has the table's keys
  "$PY" - "$1" "$2" <<'EOF'
import json, sys
recs = json.load(open(sys.argv[1]))["records"]
keys = ("arch", "T", "neuron", "ratio_floor", "ratio_t_ann", "ann_ms", "ann_convs_ms")
assert len(recs) == int(sys.argv[2]), (len(recs), sys.argv[2])
bad = [r["arch"] for r in recs if any(r.get(k) is None for k in keys)]
assert not bad, bad
print(f"{len(recs)} records, SNN / floor {min(r['ratio_floor'] for r in recs):.2f}-{max(r['ratio_floor'] for r in recs):.2f}")
EOF
}

if [ "$DEVICE" = cpu ]; then  # no GPU: the speed steps' commands on the CPU, tiny
  step "5/6 (CPU, tiny): snn_speed.py on ResNet-20 and the dense models"
  timeout 300 "$PY" benchmarks/snn_speed.py --arch resnet20 --T 3 --batch 4 --repeats 1 --warmup 1 --no-memory \
    --no-wait --no-sj --no-compile-kernel --json "$OUT/snn_speed_cpu.json" && check_records "$OUT/snn_speed_cpu.json" 2
  result "CPU speed table (ResNet-20)" $?
  timeout 600 "$PY" benchmarks/snn_speed.py --arch yolov2_tiny,yolov2_r34,deeplabv1_vgg9,deeplabv3_r34 --T 3 \
    --batch 1 --size 65 --width 0.0625 --repeats 1 --warmup 1 --no-wait --no-sj --no-compile-kernel \
    --json "$OUT/snn_speed_dense_cpu.json" && check_records "$OUT/snn_speed_dense_cpu.json" 8
  result "CPU speed table (dense models)" $?
  echo; echo "outputs in $OUT; $(($(date +%s) - STARTED)) s"
  [ ${#FAILED[@]} -eq 0 ] || { echo "FAILED: ${FAILED[*]}"; exit 1; }
  echo "the CPU-runnable steps passed (run without GPU_CHECK_DEVICE on a GPU machine for the rest)"
  exit 0
fi

step "device"
"$PY" - <<'EOF' || { echo "error: no CUDA device visible to PyTorch — run this script on a GPU machine"; exit 2; }
import sys, torch
if not torch.cuda.is_available():
    sys.exit(1)
print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"{torch.cuda.device_count()} device(s)")
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton: not installed (the Triton backend tests will fail)")
EOF

# 1 -------------------------------------------------------------------------------------------------
step "1. bit-identical spike trains, every backend (tests/test_kernels.py)"
timeout 240 "$PY" -m pytest -x -q -p no:cacheprovider tests/test_kernels.py \
  -k "cuda or backend_bit_identical or cpp_bit_identical or constant_input or triton or network_identical or settle or opcheck or auto_resolution" \
  -W ignore::RuntimeWarning
result "bit-identity tests" $?

# 2 -------------------------------------------------------------------------------------------------
step "2. classification on CUDA: main.py (2 iterations) + snn.py -e, tiny fake CIFAR-10"
DATA="$OUT/cifar"
"$PY" -c "from conftest import write_fake_cifar10; write_fake_cifar10('$DATA')"
COMMON=(--data "$DATA" --out "$OUT/result" -b 4 --test-batch-size 4 -j 0 --no-progress -id 0)
timeout 120 "$PY" classification/cifar10/main.py -a resnet20 --bit 2 --epochs 1 --max-iters 2 --no-tensorboard \
  "${COMMON[@]}" && \
timeout 120 "$PY" classification/cifar10/snn.py -a resnet20 --bit 2 -e "${COMMON[@]}" \
  --metrics-out "$OUT/snn_cuda.json" && \
"$PY" - "$OUT/snn_cuda.json" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
m = m.get("records", [m])[-1] if isinstance(m, dict) and "records" in m else m
print({k: m.get(k) for k in ("top1", "ann_top1", "T", "neuron", "samples")})
assert m.get("T") == 3 and m.get("samples"), m
EOF
result "CUDA snn.py" $?

# 3 -------------------------------------------------------------------------------------------------
step "3. 1-GPU DDP with NCCL (torchrun, torch.distributed.launch)"
timeout 120 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 classification/cifar10/snn.py \
  -a resnet20 --bit 2 -e "${COMMON[@]}" --metrics-out "$OUT/snn_ddp.json"
rc=$?
if [ $rc -eq 0 ]; then
  "$PY" - "$OUT/snn_cuda.json" "$OUT/snn_ddp.json" <<'EOF'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
pick = lambda m: m.get("records", [m])[-1] if "records" in m else m  # noqa: E731
a, b = pick(a), pick(b)
assert a.get("top1") == b.get("top1"), (a.get("top1"), b.get("top1"))
print("DDP result equals the single-process one:", b.get("top1"))
EOF
  rc=$?
fi
result "torchrun NCCL" $rc
timeout 120 "$PY" -m torch.distributed.launch --nproc_per_node=1 classification/cifar10/snn.py \
  -a resnet20 --bit 2 -e "${COMMON[@]}"
result "torch.distributed.launch NCCL" $?

# 4 -------------------------------------------------------------------------------------------------
step "4. DALI GPU pipeline (dali_main.py --loader dali, no --dali_cpu)"
if "$PY" -c "import nvidia.dali" 2>/dev/null; then
  IMG="$OUT/imagenet"
  "$PY" -c "from test_imagenet import make_image_folder; make_image_folder('$IMG')"
  timeout 150 "$PY" classification/imagenet/dali_main.py -a resnet18 --bit 2 -b 2 --test-batch-size 6 -j 1 \
    --input-size 64 --epochs 1 --lr 0.01 --loader dali --out "$OUT/result_in" --no-progress --no-tensorboard -id 0 "$IMG"
  result "DALI GPU pipeline" $?
else
  echo "[skip] NVIDIA DALI is not installed (pip install -r requirements-dali.txt)"
fi

# 5 -------------------------------------------------------------------------------------------------
step "5. speed table on the GPU, ResNet-20 batch 64, T = 3 / 7 / 15"
timeout 200 "$PY" benchmarks/snn_speed.py --device cuda --arch resnet20 --T 3,7,15 --repeats 5 --no-memory \
  --no-wait --json "$OUT/snn_speed_cuda.json"
result "GPU speed table" $?

# 6 -------------------------------------------------------------------------------------------------
step "6. speed table on the GPU, dense models at 416 / 513, batch 1 and 4, T = 3 / 15"
timeout 400 "$PY" benchmarks/snn_speed.py --device cuda --arch yolov2_tiny,yolov2_r34,deeplabv1_vgg9,deeplabv3_r34 \
  --T 3,15 --batch 1,4 --repeats 3 --no-memory --no-wait --no-sj --no-compile-kernel \
  --json "$OUT/snn_speed_dense_cuda.json" && check_records "$OUT/snn_speed_dense_cuda.json" 32
result "GPU speed table (dense models)" $?

echo
echo "outputs in $OUT; $(($(date +%s) - STARTED)) s"
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "FAILED: ${FAILED[*]}"
  exit 1
fi
echo "all GPU checks passed"
