#!/usr/bin/env bash
# Installs the toolkit with its test extras into .venv, then runs the whole test suite on the CPU.
#   bash scripts/test.sh            # everything CI runs
#   bash scripts/test.sh -k models  # extra pytest arguments pass through
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=test bash scripts/install.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
.venv/bin/python -m pytest -q "$@"
