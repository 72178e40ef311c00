#!/usr/bin/env bash
# The README's main command: set up, then run the complete Fast-SNN pipeline offline on Fashion-MNIST
# (32->4->3->2-bit ResNet-20 chain, SNN evaluation signed / unsigned at T = 7 and 3, the 2-bit signed SNN
# with 9 settle steps, fine-tuning of the 2-bit SNN with --ft-method fastsnn+e2e). About 7 minutes on 2 CPU
# cores; results, table and figures in demo_out/.
# Extra arguments go to classification/demo.py (e.g. --train-subset 8000 --epochs-fp 5; --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m classification.demo "$@"
