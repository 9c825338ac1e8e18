# Quick start: `make demo` and `make test` each set everything up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# The GPU set (constraints-gpu.txt): vLLM with the torch and transformers it requires.
GPU_PINS_VENV := .venv-gpu-pins
GPU_PINS_BIN  := $(GPU_PINS_VENV)/bin
# Tests of the code paths that depend on transformers' version (tokenizer, chat template, processors, tiny model,
# MTP fix), run again under the GPU set's transformers.
GPU_PINS_TESTS := tests/test_prompts.py tests/test_model_sources.py tests/media/test_image.py tests/engines

# vLLM's Python code (no CUDA wheel) beside the GPU set's transformers: its input processing runs on CPU.
VLLM_CPU := $(GPU_PINS_VENV)/vllm-cpu

.PHONY: install demo test test-fast lint bench render-examples clean check-gpu-pins test-gpu-pins test-vllm

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --progress-bar off -q --upgrade pip
	$(BIN)/pip install --progress-bar off -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

# The GPU set still resolves, as the README's GPU install line states it (pip's resolver only, nothing installed).
check-gpu-pins: install
	$(BIN)/pip install --dry-run --ignore-installed --quiet --progress-bar off --report $(VENV)/gpu-resolve.json \
		-c constraints-gpu.txt ".[vllm]"
	$(BIN)/python -c "import json; got = {p['metadata']['name']: p['metadata']['version'] for p in \
		json.load(open('$(VENV)/gpu-resolve.json'))['install']}; print('GPU set resolves:', \
		', '.join(f'{n} {got[n]}' for n in ('vllm', 'torch', 'transformers')))"

# A second venv layered over the first: the first venv's packages sit behind its own (a .pth file adds them), so
# only what the GPU set pins differently (transformers, tokenizers) is installed here, not a second multi-GB torch.
$(GPU_PINS_VENV)/.installed: $(STAMP) constraints-gpu.txt
	test -x $(GPU_PINS_BIN)/python || $(PYTHON) -m venv $(GPU_PINS_VENV)
	echo "import site; site.addsitedir('$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')')" \
		> "$$($(GPU_PINS_BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/first-venv.pth"
	grep -vE '^(transformers|tokenizers)==' constraints.txt > $(GPU_PINS_VENV)/constraints.txt
	$(GPU_PINS_BIN)/pip install --progress-bar off -q -c $(GPU_PINS_VENV)/constraints.txt \
		$$(grep -E '^(transformers|tokenizers)==' constraints-gpu.txt)
	touch $@

test-gpu-pins: $(GPU_PINS_VENV)/.installed
	$(GPU_PINS_BIN)/python -c "import transformers; print('transformers', transformers.__version__)"
	$(GPU_PINS_BIN)/python -m pytest -q -m "not slow" $(GPU_PINS_TESTS)

$(VLLM_CPU)/.installed: constraints-gpu.txt tests/vllm/requirements-cpu.txt $(GPU_PINS_VENV)/.installed
	$(GPU_PINS_BIN)/pip install --progress-bar off -q --no-deps --upgrade --target $(VLLM_CPU) \
		-c constraints-gpu.txt vllm -r tests/vllm/requirements-cpu.txt
	touch $@

test-vllm: $(VLLM_CPU)/.installed
	PYTHONPATH=$(CURDIR)/$(VLLM_CPU) $(GPU_PINS_BIN)/python -m pytest -q -p no:cacheprovider tests/vllm

demo: install
	$(BIN)/gemma-unified demo

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The fast tier: no Ray, no servers (stages on plain batches, media, prompts, engines, specs, the CLI's parsing).
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/python benchmarks/tokenization.py
	$(BIN)/python benchmarks/engine.py
	$(BIN)/python benchmarks/batch.py

render-examples: install
	$(BIN)/gemma-unified render-k8s infra/examples/serve.yaml --job infra/examples/job.yaml \
		--schedules infra/examples/schedules.yaml --cluster infra/examples/cluster.yaml --out infra

clean:
	rm -rf $(VENV) $(GPU_PINS_VENV) .pytest_cache .hypothesis
