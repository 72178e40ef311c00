#!/usr/bin/env bash
# The demo (scripts/demo.sh) over several seeds, reporting every figure as mean ± spread:
#   bash scripts/demo_seeds.sh                          # seeds 0 1 2 -> demo_seeds/seeds.md, seeds.json
#   bash scripts/demo_seeds.sh --seeds 0 1 2 3 --out DIR -- --epochs-fp 5   # flags after -- go to each demo run
# One seed takes about 7 minutes on an idle 2-core machine (much longer when the CPU is shared);
# seeds already done (DIR/seed_<s>/summary.json with the same demo flags) are not run again.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m classification.demo_seeds "$@"
