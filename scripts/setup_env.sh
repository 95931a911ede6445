#!/usr/bin/env bash
# Create .venv (if missing) and install the project's requirements (requirements.txt) into it. Idempotent.
# scripts/test.sh adds the test requirements (requirements-dev.txt); the demo does not need them.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# Without a torch already installed, pin one: a bare requirement could pull a multi-GB build on CPU machines.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -r requirements.txt
