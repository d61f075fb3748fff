# Two commands do all the set-up on a fresh machine:
#   make demo   - pretrain on the embedded dataset, then linear-eval (pretrained vs random-init encoder)
#   make test   - the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: demo test test-all bench bench-gpu clean

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

demo: $(VENV)/.installed
	$(PY) -m simclr_tf.demo

test: $(VENV)/.installed
	$(PY) -m pytest -q -ra

test-all: $(VENV)/.installed
	$(PY) -m pytest -q -ra -m ""

bench: $(VENV)/.installed
	$(PY) bench/run_all.py

# The accelerator throughput table (bench/gpu.py) with the machine's own Python: TensorFlow if it has it, else
# Keras on JAX (no venv: accelerator machines may have no package registry).
bench-gpu:
	$(PYTHON) bench/gpu.py

clean:
	rm -rf $(VENV) runs demo_run
