#!/usr/bin/env bash
# The GPU verification pack in one command, on a CUDA machine without network (docs/gpu.md):
#   1. installs the wheels in .whl/ (made by scripts/gpu_wheels.py where a registry is reachable)
#      offline: pip install --no-index --find-links .whl -r .whl/requirements.txt;
#   2. imports the real model from .model/ (its GGUF, whole, or as NAME.gguf.part-NN files up to
#      one folder down, with NAME.gguf.sha256) into .model/SmolLM2-135M-Instruct, unless it is there;
#   3. runs every check: python -m vicuna.gpucheck [--real-model .model/SmolLM2-135M-Instruct].
# The report goes to $GPU_CHECK_REPORT (default: gpu-report.md). Exit 1 if the set-up or a check
# failed. Without a GPU it runs the dry mode. Extra arguments go to `python -m vicuna.gpucheck`
# (e.g. --only resume-bf16,qlora, --steps 10; --list shows the checks). $PYTHON picks the interpreter.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
start=$SECONDS

if [ -f .whl/requirements.txt ]; then
  if "$PY" -c 'import os, sys, sysconfig; sys.exit(not os.access(sysconfig.get_paths()["purelib"], os.W_OK))'; then
    echo "gpu_check: installing the carried wheels offline" >&2
    "$PY" -m pip install -q --no-index --find-links .whl -r .whl/requirements.txt --no-warn-script-location \
      || { echo "gpu_check: the offline install failed (see pip above); rerun scripts/gpu_wheels.py with" \
                "--have FILE, FILE being \`$PY -m pip freeze\` of this machine" >&2; exit 1; }
  else  # a read-only environment: the wheels go beside it, first on the path
    site="${TMPDIR:-/tmp}/vicuna-gpu-site"
    echo "gpu_check: $PY's site-packages is read-only: installing the carried wheels into $site" >&2
    "$PY" -m pip install -q --no-index --no-deps --target "$site" --upgrade .whl/*.whl --no-warn-script-location \
      || { echo "gpu_check: installing the carried wheels into $site failed (see pip above)" >&2; exit 1; }
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  fi
elif compgen -G ".whl/*.whl" >/dev/null; then
  echo "gpu_check: .whl/ has wheels but no requirements.txt: make it with scripts/gpu_wheels.py" >&2
  exit 1
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
       TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

model=.model/SmolLM2-135M-Instruct
if [ ! -f "$model/config.json" ] && [ -d .model ]; then
  gguf=$(find .model -maxdepth 1 -name '*.gguf' | sort | head -n 1)
  # parts: NAME.gguf.part-NN anywhere up to .model/*/ (scripts/gpu_wheels.py puts each in its own folder)
  mapfile -t parts < <(find .model -maxdepth 2 -name '*.gguf.part-*' -printf '%f\t%p\n' | sort | cut -f2)
  if [ -z "$gguf" ] && [ "${#parts[@]}" -gt 0 ]; then
    name=$(basename "${parts[0]%.part-*}")
    gguf="$(mktemp -d)/$name"
    cat "${parts[@]}" > "$gguf"
    sum=$(find .model -maxdepth 2 -name "$name.sha256" | head -n 1)
    if [ -n "$sum" ]; then
      echo "$(cut -d' ' -f1 "$sum")  $gguf" | sha256sum -c --quiet \
        || { echo "gpu_check: $name joined from ${#parts[@]} part(s) does not match its sha256: a part is" \
                  "missing or damaged" >&2; exit 1; }
    fi
  fi
  if [ -n "$gguf" ]; then
    echo "gpu_check: importing $(basename "$gguf") into $model" >&2
    "$PY" -m vicuna weights import-gguf "$gguf" -o "$model" >&2 \
      || { echo "gpu_check: importing the GGUF failed" >&2; exit 1; }
  fi
fi
real=()
if [ -f "$model/config.json" ]; then
  real=(--real-model "$model")
else
  echo "gpu_check: no real model in .model/ (docs/gpu.md): the checks run on the tiny model only" >&2
fi

"$PY" -m vicuna.gpucheck --report "${GPU_CHECK_REPORT:-gpu-report.md}" "${real[@]}" "$@"
rc=$?
echo "gpu_check: exit $rc after $((SECONDS - start)) s (set-up included)" >&2
exit $rc
