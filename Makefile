# One-command entry points for a fresh Linux machine (Python 3.10+ with venv).
#   make demo   install, then segment the offline liver CT with the shipped demo model; rerunnable
#               (--overwrite replaces the previous meddinov3-demo/ files)
#   make test   install with test extras, then run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Every transitive dependency pinned to the versions CI tests.
PIP_INSTALL := $(BIN)/pip install --disable-pip-version-check -q -c requirements.lock

.PHONY: install install-test demo test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml requirements.lock
	$(PIP_INSTALL) -e .
	# real CT used by the demo and the tests (LiTS case 117, MIT); its own dependencies are not needed
	$(PIP_INSTALL) --no-deps liver-ct-segmentation-package==1.6.0
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP_INSTALL) -e ".[test]"
	# nnU-Net, the fidelity tests' oracle: without its pins (dynamic-network-architectures wants timm<1.0.23); its
	# other requirements come with the test extra
	$(PIP_INSTALL) --no-deps nnunetv2==2.8.1 dynamic-network-architectures==0.4.4
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/meddinov3 demo --overwrite

test: install-test
	$(BIN)/python -m pytest -q Testing

clean:
	rm -rf $(VENV) meddinov3-demo
