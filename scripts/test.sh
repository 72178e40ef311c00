#!/usr/bin/env bash
# The test command (README; also what CI runs): set up, then run the whole test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
FASTSNN_DALI=1 bash scripts/setup.sh   # the DALI CPU-pipeline tests run when it installs
exec .venv/bin/python -m pytest "$@"
