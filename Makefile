# Two commands work on a fresh machine: `make demo` and `make test`.
# Both create .venv, install torch==2.13.0 first (an unpinned torch pulls the CUDA build),
# then bnfold with its extras, then run.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.bnfold-installed

.PHONY: demo test bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[torch,test]'
	$(PY) -m compileall -q bnfold  # an editable install is not byte-compiled; saves ~0.1 s per run
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

MODELS := .cache/models
DEMO   := .cache/demo

# Build two models of the zoo (cached), fold each, validate it against the original on the
# sample inputs the build saved, and print the reports.
demo: $(STAMP)
	$(PY) -m models.build --out $(MODELS) --only resnet,preact
	mkdir -p $(DEMO)
	$(VENV)/bin/bnfold fold $(MODELS)/resnet.onnx -o $(DEMO)/resnet.folded.onnx --inputs $(MODELS)/resnet.inputs.npz
	@echo
	$(VENV)/bin/bnfold fold $(MODELS)/preact.onnx -o $(DEMO)/preact.folded.onnx --inputs $(MODELS)/preact.inputs.npz

# The benchmark (bench/RESULTS.md): every tool in its own process, median of 3, ratios against
# onnx.load + onnx.save. About 30 min; BENCH_ARGS=--skip-large leaves out the 1.47 GB model
# (whose peers need ~10 GB of memory), BENCH_ARGS=--quick is a ~70 s smoke run.
bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[torch,test,bench]'
	$(PY) -m compileall -q bnfold  # sources edited since the install would be recompiled in every run
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .cache .pytest_cache .hypothesis
