# ran: one venv, three commands. `make demo` and `make test` each set up what they need.
PY      ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: setup test test-unit demo models bench clean

setup: $(STAMP)

# Re-install only when the package metadata changes; the editable install picks up code edits.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -qq --upgrade pip
	$(BIN)/python -m pip install -qq -e '.[dev]'
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-unit: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit

models: setup
	$(BIN)/ran models

# The README's first command: synthetic shards (once), then a 2-worker CPU training run on a local
# Ray, tracked in ./mlflow.db and registered as ran-demo. A few minutes on 2 cores.
demo: setup
	test -f data/synth/manifest.json || $(BIN)/ran data synth --output data/synth --classes 10 --train 3000 --val 1000 --size 32 --seed 0
	$(BIN)/ran train jobs/demo.yaml

clean:
	rm -rf $(VENV) runs mlruns mlartifacts mlflow.db

# The embedded MLflow store (what `ran train` writes without MLFLOW_TRACKING_URI) on 127.0.0.1:5000.
.PHONY: mlflow-ui
mlflow-ui: setup
	$(BIN)/mlflow server --backend-store-uri sqlite:///mlflow.db --default-artifact-root ./mlartifacts --host 127.0.0.1 --port 5000
