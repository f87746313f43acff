#!/usr/bin/env bash
# Creates .venv (if missing) and installs the toolkit into it.
#   bash scripts/install.sh          # runtime dependencies
#   EXTRAS=test bash scripts/install.sh
# torch is installed first and pinned: asking pip for plain "torch" on a machine without it
# would fetch a multi-GB CUDA build; 2.13.0 takes the CPU wheel on CPU-only machines.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q "$TORCH_SPEC"
fi
extras=${EXTRAS:+[$EXTRAS]}
.venv/bin/pip install -q -e ".$extras"
.venv/bin/python -c "import finetune" 
