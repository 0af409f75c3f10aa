# Two entry points for newcomers: `make demo` and `make test`; both build .venv themselves.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-oldest bench bench-quick clean

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

# The whole suite on the oldest torch setup.py claims (torch 2.11 with triton 3.6, the GPU machine's
# versions), in .venv-oldest: pip downloads torch 2.11's CUDA build from PyPI (about 3 GB; the CPU runs
# it without a GPU).  numpy < 2.3: triton 3.6's interpreter calls int() on 1-element arrays, which
# numpy 2.4 refuses.  Not part of CI.
OLD := .venv-oldest
test-oldest:
	$(PY) -m venv $(OLD)
	$(OLD)/bin/python -m pip install -q torch==2.11.0 triton==3.6.0 "numpy<2.3" tqdm matplotlib ninja pytest \
		scikit-learn hypothesis==6.170.17 expecttest==0.3.0
	$(OLD)/bin/python -m pip install -q --no-deps torch-clip==0.0.6 zclip==1.0.0 pytorch-optimizer==4.1.0
	rm -rf build/oldest && mkdir -p build/oldest && \
		tar --exclude=./.git --exclude=./.venv --exclude=./$(OLD) --exclude=./build -cf - . | tar -xf - -C build/oldest && \
		cp -r kernels build/oldest/torch_clip_fused/kernels && cp -r csrc build/oldest/torch_clip_fused/csrc
	cd build/oldest && TORCH_EXTENSIONS_DIR=$(CURDIR)/build/oldest-ext PYTHONPATH=. \
		$(CURDIR)/$(OLD)/bin/python -m pytest -q -p no:cacheprovider tests torch_clip_fused

clean:
	rm -rf $(VENV) $(OLD) build *.egg-info
