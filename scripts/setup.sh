#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: a virtual environment in .venv with the pinned requirements,
# this project installed in editable mode, and Debian's Fashion-MNIST files (used by the demo).
# Set FASTSNN_DALI=1 to also install NVIDIA DALI (optional; CPU pipelines work without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat .venv/.fastsnn-setup 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing requirements (torch from the local wheel cache or PyPI; a few minutes)"
  .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt 2> >(grep -v "is ignored" >&2)
  .venv/bin/pip install -q --disable-pip-version-check --no-deps -e . --config-settings editable_mode=compat \
    2> >(grep -v "is ignored" >&2)
  echo "$want" > .venv/.fastsnn-setup
fi
if [ "${FASTSNN_DALI:-0}" = 1 ] && ! .venv/bin/python -c "import nvidia.dali" 2>/dev/null; then
  echo "[setup] installing NVIDIA DALI"
  .venv/bin/pip install -q --disable-pip-version-check -r requirements-dali.txt 2> >(grep -v "is ignored" >&2) \
    || echo "[setup] warning: DALI could not be installed; the torchvision loaders are used instead" >&2
fi
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "[setup] installing Debian's dataset-fashion-mnist"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  { $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; }; } \
    || echo "[setup] warning: could not install dataset-fashion-mnist (the demo needs it, the tests do not)" >&2
fi
if [ ! -d /usr/share/doc/labelme-examples/examples/bbox_detection ]; then
  echo "[setup] installing Debian's labelme-examples (real VOC / COCO files for the detection and segmentation tests)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  { $SUDO apt-get install -y -q labelme-examples >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q labelme-examples >/dev/null 2>&1; }; } \
    || echo "[setup] warning: could not install labelme-examples (the tests that read its files are skipped)" >&2
fi
echo "[setup] ready: $(.venv/bin/python -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)')"
