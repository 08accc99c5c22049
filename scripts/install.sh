#!/usr/bin/env bash
# Install everything: the package with all extras, then Horovod 0.28.1 built for this TensorFlow
# (scripts/install_horovod.sh; about 8 minutes the first time, nothing when it is already there).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
"$PYTHON" -m pip install -e ".[all]"
PYTHON="$PYTHON" bash scripts/install_horovod.sh
