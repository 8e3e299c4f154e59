#!/usr/bin/env bash
# The project's test command (README, command two; what CI runs): creates or reuses the
# virtual environment, installs, builds the extension, then runs the test suite.
# Extra arguments go to pytest.
set -euo pipefail
. "$(dirname "$0")/env.sh"
python -c "import piip_kernels; piip_kernels.backend_report()"
# GPU tests (marker "gpu") run only where a GPU is: bench/gpu_check.sh runs them there. The tests
# against the real Ultralytics/RF-DETR (marker "packages") need a torchvision that loads: they run
# in their own environment (scripts/test_integrations.sh, called by CI after this suite).
if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then MARK="not packages"; else MARK="not gpu and not packages"; fi
python -m pytest tests -q -m "$MARK" "$@"
# The cost-table script on a few presets (the full table takes about 45 s).
python bench/flops.py --quiet --config tsb_1568_1120_672 --config tsb_368 --config h6b_1024_512_fpn > /dev/null
