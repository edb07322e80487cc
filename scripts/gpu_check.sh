#!/usr/bin/env bash
# The GPU verification pack in one call (docs/gpu.md). On the lent H200: installs the wheels
# carried in .whl/ (pinned; see docs/gpu.md for how to fetch them), then runs every check and
# writes gpu-report.md (also to $OUT when the device tool sets it). Exit 1 if a check failed.
# On a CPU machine it runs the dry mode. Extra arguments go to `python -m vicuna.gpucheck`.
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_check: installing the carried wheels failed" >&2; exit 1; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
real=()
if [ -d .model/SmolLM2-135M-Instruct ]; then real=(--real-model .model/SmolLM2-135M-Instruct); fi
report="${OUT:-.}/gpu-report.md"
python3 -m vicuna.gpucheck --report "$report" "${real[@]}" "$@"
