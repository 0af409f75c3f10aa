# Two entry points for newcomers: `make demo` and `make test`; both build .venv themselves.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench bench-quick clean

$(STAMP): requirements-dev.txt setup.py
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q -r requirements-dev.txt
	$(VPY) -m pip install -q --no-deps torch-clip==0.0.6
	$(VPY) -m pip install -q --no-deps zclip==1.0.0
	$(VPY) -m pip install -q --no-deps pytorch-optimizer==4.1.0
	$(VPY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VPY) -m torch_clip_fused.experiments.demo

# the test suite, then the package's docstring examples (--doctest-modules: see pytest.ini)
test: $(STAMP)
	$(VPY) -m pytest -q tests torch_clip_fused

bench: $(STAMP)
	$(VPY) bench/benchmark_clipped_sgd.py

bench-quick: $(STAMP)
	$(VPY) bench/benchmark_clipped_sgd.py --quick

clean:
	rm -rf $(VENV) build *.egg-info
