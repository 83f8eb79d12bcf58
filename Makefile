# One entry for users and CI. Each target installs what it needs into .venv on first use (pip, this machine's
# local wheels), and skips that quickly afterwards: the stamp is rebuilt only when pyproject.toml changes.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-extended test-fast lint demo clean-ext

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@# Compile the fused CPU kernel now (the CUDA one builds on first use on a GPU, or: python -m pretrain.ops build --cuda).
	$(PY) -m pretrain.ops build || echo "warning: the DCNv3 CPU kernel did not build; the PyTorch reference will be used"
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -m "not extended"

# The checks that do not fit CI's 60 minutes (torch.compile's cold compiles of InternImage): run them before a release.
test-extended: $(STAMP)
	$(PY) -m pytest -m extended

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

demo: $(STAMP)
	$(PY) -m pretrain demo

clean-ext:
	rm -rf $${DCNV3_BUILD_DIR:-$$HOME/.cache/internimage_pretrain}

# GPU acceptance (docs/GPU.md). gpu-wheels puts into the ignored .whl/ what a CUDA machine without network lacks:
# Python 3.12 wheels of DeepSpeed, WebDataset, torchdata, submitit, open_clip, simplejpeg and their missing needs
# (one version each: pip stops on two), the real test data and the DCNv4 anchor. gpu-check runs the check with the
# machine's python3 when it has CUDA, else rehearses it with the venv (benchmarks/gpu_check.py).
GPU_WHEELS := webdataset==1.0.2 braceexpand==0.1.7 torchdata==0.11.0 submitit==1.5.4 open_clip_torch==3.3.0 \
	simplejpeg==1.9.0 hjson==3.1.0 ftfy==6.3.1 wcwidth==0.9.4 pydantic==2.14.4 pydantic_core==2.50.5 \
	annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0
PIP_312 := --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
	--platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	--platform manylinux1_x86_64
SHARED := ../shared
GPU_PY ?= $(shell python3 -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null \
	&& echo python3 || (test -x $(PY) && echo $(PY) || echo python3))

.PHONY: gpu-wheels gpu-check

gpu-wheels:
	@mkdir -p .whl/anchors .whl/data
	for w in $(GPU_WHEELS); do python3 -m pip download -q $(PIP_312) -d .whl $$w || exit 1; done
	@# DeepSpeed has no binary wheel on the index; its pure-Python wheel, ops left to build just in time.
	DS_BUILD_OPS=0 $(VENV)/bin/pip wheel -q --no-deps -w .whl deepspeed==$$($(PY) -c \
		"import importlib.metadata as m; print(m.version('deepspeed'))")
	cp -f $(SHARED)/anchors/DCNv4-1.0.0.post2.tar.gz .whl/anchors/
	@# tests/conftest.py reads ../shared/data/real; fashion-mnist is not used by the GPU tests.
	rm -rf .whl/data/real && mkdir -p .whl/data/real
	for f in $(SHARED)/data/real/*; do case $$f in *fashion-mnist) ;; *) cp -a $$f .whl/data/real/ ;; esac; done
	@du -sh .whl

gpu-check:
	PYTHONUNBUFFERED=1 $(GPU_PY) benchmarks/gpu_check.py
