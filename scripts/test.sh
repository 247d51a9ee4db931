#!/usr/bin/env bash
# README command 2: set up (idempotent) and run the whole test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k dpp`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-cpu.sh
VENV=${VENV:-.venv}
export TRITON_INTERPRET=1  # Triton kernels run on CPU through the interpreter
set +e
"$VENV/bin/python" -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit "$rc"
