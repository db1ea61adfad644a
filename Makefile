# Quick start: `make demo` and `make test`. Both set up .venv first and are idempotent.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
# Ray's token auth on every local cluster: GCS, raylets and the job API listen beyond loopback (Ray binds every
# interface), so without a token anyone on the network can run code here. The token lives in the project's cache
# (0600), not ~/.ray; `ray job submit` and `serve deploy` read it from the same two variables.
export RAY_AUTH_MODE ?= token
export RAY_AUTH_TOKEN_PATH ?= $(CURDIR)/.cache/ray/auth_token

.PHONY: venv token test test-fast demo bench clean

venv: $(STAMP)

token: $(RAY_AUTH_TOKEN_PATH)

$(RAY_AUTH_TOKEN_PATH): | $(STAMP)
	$(PY) -c "import sys; from pipelines.args import write_token; write_token(sys.argv[1])" '$@'

$(STAMP): pyproject.toml
	command -v java >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends default-jre-headless; }
	command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: $(STAMP) token
	$(PY) -m pytest -q -ra

test-fast: $(STAMP) token
	$(PY) -m pytest -q -ra -m "not slow"

demo: $(STAMP) token
	$(VENV)/bin/dynrefer demo

bench: $(STAMP) token
	OMP_NUM_THREADS=1 $(PY) benchmarks/phash.py
	$(PY) benchmarks/prepare.py
	$(PY) benchmarks/serve_load.py

clean:
	rm -rf $(VENV) .cache demo
