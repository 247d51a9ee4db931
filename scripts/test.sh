#!/usr/bin/env bash
# README command 2: set up (idempotent) and run the whole test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k dpp`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-cpu.sh
VENV=${VENV:-.venv}
# Without a CUDA device the Triton kernels run on CPU through Triton's interpreter; with
# one they are compiled and run for real, and the `gpu`-marked tests run too.
if [ -z "${TRITON_INTERPRET:-}" ]; then
  if "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
      2>/dev/null; then
    echo "[test] CUDA device found: Triton kernels compiled for it, gpu tests included"
  else
    export TRITON_INTERPRET=1
  fi
fi
set +e
"$VENV/bin/python" -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit "$rc"
