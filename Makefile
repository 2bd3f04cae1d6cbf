# The two commands of the README:
#   make demo   set up .venv and run the main job on its embedded default
#   make test   set up .venv and run the test suite
#   make device-wheels   DeepSpeed and its missing dependencies as wheels in .whl/ for tools/device_bench.sh
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# torch is named in the SAME pip command as deepspeed, or pip may pick a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: demo test setup clean device-wheels

setup: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)" -e ".[mpi,test,eval]"
	touch $(STAMP)

demo: $(STAMP)
	DS_ACCELERATOR=cpu $(VENV)/bin/rdhpc demo --run-dir runs/demo

test: $(STAMP)
	DS_ACCELERATOR=cpu $(PY) -m pytest -q tests

device-wheels: $(STAMP)
	$(PY) tools/device_wheels.py --out .whl

clean:
	rm -rf $(VENV) runs
