#!/usr/bin/env bash
# The offline detection demo: set up, then the whole Fast-SNN detection pipeline on the Fashion-MNIST
# scene set (yolov2_tiny --width 0.5 at 128x128, 18000 training scenes of 1-2 items; the backbone first pretrained
# as a Fashion-MNIST classifier on single-item 96x96 canvases; 32->4->3->2-bit chain, SNN evaluation at
# T = 15 / 7 / 3 with signed and unsigned IF neurons, layer-wise fine-tuning of the 2-bit SNN). About 12
# minutes on an idle 2-core CPU with AVX-512, up to about three times that with AVX2 only (each stage prints the time left); table, JSON,
# figures and boxes_*.png (ANN and SNN side by side) in demo_out/detection/. Run again after a kill, it
# continues where it stopped (--fresh starts over).
# Extra arguments go to detection/offline_demo.py (e.g. --pretrain 0 --fresh; --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m detection.offline_demo "$@"
