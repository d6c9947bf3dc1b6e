# Two commands work on a fresh machine: `make demo` and `make test`.
# Both create .venv, install torch==2.13.0 first (an unpinned torch pulls the CUDA build),
# then bnfold with its extras, then run.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.bnfold-installed

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[torch,test]'
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

demo: $(STAMP)
	$(PY) -m bnfold.reference.demo

clean:
	rm -rf $(VENV) .cache .pytest_cache .hypothesis
