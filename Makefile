# One entry for users and CI. Each target installs what it needs into .venv on first use (pip, this machine's
# local wheels), and skips that quickly afterwards: the stamp is rebuilt only when pyproject.toml changes.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-fast lint demo clean-ext

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@# Compile the fused CPU kernel now (the CUDA one builds on first use on a GPU, or: python -m pretrain.ops build --cuda).
	$(PY) -m pretrain.ops build || echo "warning: the DCNv3 CPU kernel did not build; the PyTorch reference will be used"
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

demo: $(STAMP)
	$(PY) -m pretrain demo

clean-ext:
	rm -rf $${DCNV3_BUILD_DIR:-$$HOME/.cache/internimage_pretrain}
