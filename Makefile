VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# what `spach` itself needs (make demo); the full install above adds the test and export extras
RUN_STAMP := $(VENV)/.installed-run

.PHONY: install test demo bench bench-gpu bench-original gpu-check clean slurm-up slurm-down ray-up ray-down timm-tests

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev,export,mlflow,ray]'
	touch $(STAMP) $(RUN_STAMP)

$(RUN_STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -e .
	touch $(RUN_STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 tests

demo: $(RUN_STAMP)
	$(VENV)/bin/spach battle cpu-fashion --out runs/cpu-fashion

bench: $(STAMP)
	mkdir -p runs
	$(VENV)/bin/spach bench --models zoo --batch 16 --img-size 224 --dtype fp32 bf16 --mode infer train --threads 2 --json runs/bench-zoo-$$(date +%Y%m%d-%H%M%S).json

# GPU readiness: zoo bf16 inference at batch 256, 200 bf16 training steps of the MS-S models
# (channels_last + torch.compile), images/s and MFU; a clear message and exit 0 without CUDA
bench-gpu: $(STAMP)
	$(PY) benchmarks/gpu.py --json runs/bench-gpu.json

# the training step against the original release's block maths, same weights, side by side
bench-original: $(STAMP)
	$(PY) benchmarks/original_step.py --threads 2 --repeats 5

# the GPU path end to end (< 5 min on a CUDA machine; a message and exit 0 without CUDA)
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py --out runs/gpu-check-$$(date +%Y%m%d-%H%M%S)

# timm's own model tests (its release's tests/test_models.py) over every spach model; fetches timm's sdist once
# into ~/.cache/spach/timm-tests (the weight-download tests deselected); long: every full-size model at
# timm's test sizes, TorchScript compiles included (benchmarks/RESULTS.md)
timm-tests: $(STAMP)
	PY=$(PY) tools/timm-model-tests.sh

# a single-node Slurm cluster on this machine (root installs slurm-wlm + munge when missing); see docs/cluster.md
slurm-up:
	tools/slurm-local.sh up

slurm-down:
	tools/slurm-local.sh down

# a one-node Ray cluster on 127.0.0.1:6390 (the venv's ray, `pip install 'spach[ray]'`); see docs/cluster.md
ray-up: $(STAMP)
	RAY=$(VENV)/bin/ray tools/ray-local.sh up

ray-down:
	RAY=$(VENV)/bin/ray tools/ray-local.sh down

clean:
	rm -rf $(VENV) build *.egg-info runs
