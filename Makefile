# The README's commands. Each target bootstraps what it needs (.venv, the compiled extension)
# and redoes a step only when its inputs changed (stamps in .stamps/).
#
#   make run     the main job: a distillation run on the embedded default
#   make test    the whole test suite
#   make gpu     on a GPU host: build, GPU tests and GPU benchmarks in one timed command
#   make bench   kernel microbenchmarks (`fastkd bench` on BENCHMARKS.md's cases, every device
#                here); BENCHMARKS.md, its generated side files (docs/gpu-static.md: every GPU
#                kernel's resources; docs/benchmarks-raw.md: every benchmark's statistics) and
#                docs/bench-overview.png regenerated from the measured run
#   make mutate  plant each bug of tools/mutations.toml in a copy of the tree and check that the
#                tests catch it (not part of `make test`: it builds the extension in the copy)
#
# FASTKD_NO_CUDA=1 skips the CUDA sources in the build (fast local iteration).
# .gpu-static-cache/ holds the cubins and resource reports of tools/gpu_static.py (the GPU
# kernels compiled for sm_80/sm_90 by tests/test_gpu_static.py and make bench), keyed by source
# hash; make clean removes it.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMPS := .stamps
NATIVE_SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh') setup.py pyproject.toml

.PHONY: run test bench gpu mutate build venv clean

run: build
	$(PY) -m fastkd distill $(ARGS)

test: build
	$(PY) -m pytest tests -q $(ARGS)

# The run's folder (results.json, results.md, plots, pytest.log) is kept in $(BENCH_OUT).
BENCH_OUT := .bench/make-bench
# Measurements kept in the repository and rendered as they are: fastkd bench runs on GPU hosts,
# and the teacher cache on the language-model job (python tools/teacher_cache_experiment.py, about 35 min).
CACHE_RUNS := $(wildcard bench/measured/teacher-cache-*.json)

bench: build
	rm -rf $(BENCH_OUT)
	$(PY) -m fastkd bench --suite report --device all --out $(BENCH_OUT) $(ARGS)
	$(PY) -m bench.report --from-json $(BENCH_OUT)/results.json --gpu-static --out BENCHMARKS.md \
		--gpu-runs $(filter-out $(CACHE_RUNS),$(wildcard bench/measured/*.json)) --cache-runs $(CACHE_RUNS)
	cp $(BENCH_OUT)/overview.png docs/bench-overview.png

# On a GPU host, with that host's own Python (it reaches no package index, so no .venv there):
#   make gpu PYTHON=python3 GPU_OUT="$$OUT"
# builds for that GPU, runs the GPU tests and the GPU benchmarks in 8 minutes (tools/gpu_run.py).
GPU_OUT ?= .gpu-run

gpu:
	$(PYTHON) tools/gpu_run.py --out $(GPU_OUT) $(ARGS)

# The developer's tree is never edited: the copy is made and built by tools/mutate.py itself.
# ARGS, e.g. ARGS="--only kd-cpu-stream-ce" or ARGS="--tree .mutate" (kept, rebuilt incrementally).
mutate: venv
	$(PY) tools/mutate.py $(ARGS)

venv: $(STAMPS)/venv
build: $(STAMPS)/build

$(STAMPS)/venv: requirements-dev.txt
	@mkdir -p $(STAMPS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements-dev.txt
	@touch $@

# The stamp also records whether CUDA was compiled in, so that changing FASTKD_NO_CUDA rebuilds.
$(STAMPS)/build: $(STAMPS)/venv $(NATIVE_SOURCES) $(STAMPS)/cuda-$(if $(filter-out 0,$(FASTKD_NO_CUDA)),off,on)
	$(PY) -m pip install --disable-pip-version-check -q --no-build-isolation --no-deps -e .
	@touch $@

$(STAMPS)/cuda-%:
	@mkdir -p $(STAMPS)
	@rm -f $(STAMPS)/cuda-*
	@touch $@

clean:
	rm -rf $(STAMPS) build *.egg-info fastkd/_C*.so .gpu-static-cache .mutate
