# The two quick-start commands of the README:
#   make demo   set up .venv and run the main job (python run_pretrain.py: the embedded default)
#   make test   set up .venv and run the test suite (what CI runs)
#
# TORCH_SPEC picks the PyTorch build. The default is the CPU wheel; GPU users choose their own, e.g.
#   make test TORCH_SPEC="torch==2.9.1" TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(BIN)/python -m pip install --quiet -e ".[test,dicom,augment,faiss,demo]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/python run_pretrain.py

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) outputs
