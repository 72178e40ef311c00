#!/usr/bin/env bash
# The segmentation demo (docs/segmentation.md): set up, then run the Fast-SNN segmentation pipeline offline on
# the shared scene set -- the backbone pretrained on the objects of the training masks, 32->4->3->2-bit DeepLab
# VGG-9 (width 0.5, 65-pixel crops, 12000 training scenes, 12 epochs at 32 bits in bfloat16 autocast where the CPU
# has it), SNN evaluation at T = 15 / 7 / 3 with
# signed and unsigned IF neurons, layer-wise fine-tuning of the 2-bit SNN. 12 to about 35 minutes on an idle 2-core CPU,
# depending on its vector units (each stage prints the time left);
# table, summary.json and figures (masks_*.png: ANN and SNN side by side) in demo_out/segmentation/. Run again
# after a kill, it continues where it stopped (--fresh starts over).
# Extra arguments go to segmentation/demo.py (e.g. --train 2000 --epochs-fp 96; --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m segmentation.demo "$@"
