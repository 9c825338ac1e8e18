# Quick start: `make demo` and `make test` each set everything up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench render-examples clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --progress-bar off -q --upgrade pip
	$(BIN)/pip install --progress-bar off -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: install
	$(BIN)/gemma-unified demo

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/tokenization.py
	$(BIN)/python benchmarks/engine.py
	$(BIN)/python benchmarks/batch.py

render-examples: install
	$(BIN)/gemma-unified render-k8s infra/examples/serve.yaml --job infra/examples/job.yaml \
		--schedules infra/examples/schedules.yaml --cluster infra/examples/cluster.yaml --out infra

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
