#!/usr/bin/env bash
# Set up .venv and run the whole test suite on the CPU (the README's test command; CI runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python -m pip install -q -r requirements-dev.txt  # pytest, lm-eval
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest "$@"
