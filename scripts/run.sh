#!/usr/bin/env bash
# The project's main job on a fresh machine (README, command one): creates or reuses the
# virtual environment, installs, builds, then runs the kernel demo (which prints the
# backend report first) and prints the papers' cost tables recounted from our models.
# Extra arguments go to bench/flops.py (for example --config tsb).
set -euo pipefail
. "$(dirname "$0")/env.sh"
python examples/msda_demo.py
python bench/flops.py "$@"
