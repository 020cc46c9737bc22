# One-command entry points for a fresh Linux machine (Python 3.10+ with venv).
#   make demo   install, then segment the offline liver CT with the shipped demo model; rerunnable
#               (--overwrite replaces the previous meddinov3-demo/ files)
#   make test   install with test extras, then run the whole test suite, then the Slicer-Python leg
#   make test-slicer-python   the tests marked slicer_python under Python 3.9 as 3D Slicer 5.8 embeds it
#               (numpy 1.26.4, no psutil; venv .venv-slicer39 from Testing/slicer-python-requirements.txt);
#               the Slicer modules' Logic tests stay in .venv (slicer-core) with their child processes on 3.9
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Every transitive dependency pinned to the versions CI tests.
PIP_INSTALL := $(BIN)/pip install --disable-pip-version-check -q -c requirements.lock

# Python 3.9 for the Slicer-Python leg: PYTHON39=..., else pyenv's newest 3.9, else python3.9 on PATH
PYENV_ROOT ?= $(shell pyenv root 2>/dev/null || echo $(HOME)/.pyenv)
PYTHON39 ?= $(or $(shell ls -d $(PYENV_ROOT)/versions/3.9*/bin/python 2>/dev/null | sort -V | tail -n 1),$(shell command -v python3.9))
SLICER_VENV := .venv-slicer39
SLICER_REQUIREMENTS := Testing/slicer-python-requirements.txt
SLICER_TESTS := Testing/core Testing/train Testing/pretrain Testing/engine

.PHONY: install install-test install-slicer-python demo test test-slicer-python clean

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

$(SLICER_VENV)/.installed: $(SLICER_REQUIREMENTS)
	@test -n "$(PYTHON39)" || { echo "Python 3.9 not found: pyenv install 3.9, or make PYTHON39=/path/to/python3.9"; exit 1; }
	$(PYTHON39) -m venv $(SLICER_VENV)
	$(SLICER_VENV)/bin/pip install --disable-pip-version-check -q -r $(SLICER_REQUIREMENTS)
	$(SLICER_VENV)/bin/pip install --disable-pip-version-check -q --no-deps liver-ct-segmentation-package==1.6.0
	@# Slicer ships no psutil: the leg checks that the code does without it
	$(SLICER_VENV)/bin/python -c "import importlib.util as u, sys; sys.exit('psutil is installed' if u.find_spec('psutil') else 0)"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test
install-slicer-python: $(SLICER_VENV)/.installed

demo: install
	$(BIN)/meddinov3 demo --overwrite

test: install-test
	$(BIN)/python -m pytest -q Testing
	$(MAKE) test-slicer-python

# The core's tests under 3.9 directly (the core from this checkout, on PYTHONPATH: pip would refuse its
# requires-python); the Logic tests with slicer-core (no 3.9 wheel) in .venv, their PythonSlicer children on 3.9.
# nnU-Net (the fidelity tests' oracle, Python >= 3.10) is not in the 3.9 venv: its test module is not collected there.
test-slicer-python: install-test install-slicer-python
	PYTHONPATH=$(CURDIR) $(SLICER_VENV)/bin/python -m pytest -q -m slicer_python $(SLICER_TESTS) \
		--ignore=Testing/engine/test_nnunet_fidelity.py
	MEDDINOV3_TEST_SLICER_PYTHON=$(CURDIR)/$(SLICER_VENV)/bin/python $(BIN)/python -m pytest -q -m slicer_python \
		Testing/slicer

clean:
	rm -rf $(VENV) $(SLICER_VENV) meddinov3-demo
