# ran: one venv, three commands. `make demo` and `make test` each set up what they need.
PY      ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: setup test test-unit demo models bench clean postgres

setup: $(STAMP)

# Re-install only when the package metadata changes; the editable install picks up code edits.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -qq --upgrade pip
	$(BIN)/python -m pip install -qq -e '.[dev]'
	touch $(STAMP)

test: setup postgres
	$(BIN)/python -m pytest -q -p no:cacheprovider

# PostgreSQL server binaries for the team tracking server's tests and benchmark
# (cluster/tracking/postgres.sh): Debian's package, installed when missing (as root, with apt-get;
# no cluster of its own is created or started). Measured on Debian 12 here: apt-get update 5 s,
# downloading the 19 MB of packages 8 s; unpacking and configuring them comes on top.
postgres:
	@if ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || command -v postgres >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian's postgresql (server binaries for the team tracking server tests)"; \
	  mkdir -p /etc/postgresql-common && \
	  { grep -qs '^create_main_cluster' /etc/postgresql-common/createcluster.conf || \
	    echo 'create_main_cluster = false' >> /etc/postgresql-common/createcluster.conf; } && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    -o Dpkg::Options::=--force-confold --no-install-recommends postgresql >/dev/null; \
	else echo "PostgreSQL server binaries missing: install your system's postgresql package" \
	  "(Debian/Ubuntu: sudo apt-get install postgresql) or set RAN_PG_BIN" >&2; exit 1; fi

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

# Serve a registered model on 127.0.0.1:$(PORT) with MLflow's scoring server (POST JPEGs as base64
# JSON to /invocations; README). The server starts `uvicorn` by name, so the venv's bin directory
# goes on PATH; the store is MLFLOW_TRACKING_URI or the embedded ./mlflow.db. Only ran's own models
# are served: ran.tracking.provenance downloads the version and checks it (pyfunc loader ran.serving,
# no pickled python_model, no code_paths, consistent side files), and the server serves that checked
# copy, never what the alias may point at a moment later; MLflow's pickle loading stays off.
MODEL ?= models:/ran-demo@champion
PORT  ?= 5001
.PHONY: serve
serve: setup
	@dir=$$(mktemp -d) && trap 'rm -rf "$$dir"' EXIT && trap 'exit 130' INT && trap 'exit 143' TERM && \
	export MLFLOW_TRACKING_URI="$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db}" \
	  MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false && \
	checked=$$($(BIN)/python -m ran.tracking "$(MODEL)" --to "$$dir") && \
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/mlflow models serve -m "$$checked" --env-manager local \
	  -h 127.0.0.1 -p $(PORT)

# The embedded MLflow store (what `ran train` writes without MLFLOW_TRACKING_URI) on 127.0.0.1:5000.
.PHONY: mlflow-ui
mlflow-ui: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --default-artifact-root ./mlartifacts --host 127.0.0.1 --port 5000 --workers 1
