# Two entry points: `make demo` (the main job on embedded defaults) and `make test` (everything CI
# runs). Both install what they need; heavy things are cached outside the checkout.
CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/prefect-gpu-operator
# One virtualenv per checkout: an editable install points at exactly one source tree.
VENV  ?= $(CACHE)/venvs/$(shell pwd | sha1sum | cut -c1-12)
PY    := $(VENV)/bin/python
BIN   := $(VENV)/bin

.PHONY: demo test lint unit chart integration install tools generate lock images

# The operator (this directory), the flows and the sandbox, each its own distribution.
install:
	@test -x $(PY) || { python3 -m venv $(VENV) && $(PY) -m pip install -q --upgrade pip; }
	@$(PY) -m pip install --quiet --disable-pip-version-check \
		-e . -e './flows[inference]' -e './sandbox[test]'

tools: install
	@$(BIN)/prefect-gpu-sandbox install-tools >/dev/null

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check operator flows sandbox tests
	$(BIN)/mypy
	$(BIN)/lint-imports

# Files generated from one source each; tests fail when a committed copy is stale.
generate: install
	$(BIN)/prefect-gpu-operator crd > charts/prefect-gpu-operator/crds/gpulimitpolicies.prefectgpu.io.yaml
	{ echo '# Generated from operator/prefect_gpu_operator/api/limit_names.py by `make generate`: do not edit.'; \
	  echo; cat operator/prefect_gpu_operator/api/limit_names.py; } > flows/prefect_gpu_flows/_limit_names.py
	tools=$$($(BIN)/prefect-gpu-sandbox install-tools) && \
	  HELM=$$tools/helm bash charts/render-manifests.sh manifests && \
	  HELM_DOCS=$$tools/helm-docs bash charts/render-readme.sh

# The images' exact dependencies (constraints/<target>.txt), resolved from the pyprojects by uv;
# versions already locked stay unless they no longer fit. A unit test fails when one is stale.
lock: install
	$(BIN)/prefect-gpu-sandbox lock-images

# The Dockerfile's images as OCI archives, built offline and cached by content (needs root).
images: install
	$(BIN)/prefect-gpu-sandbox build-images

unit: install
	$(PY) -m pytest tests/unit

# The chart as helm renders it and kubeconform judges it: no control plane.
chart: tools
	$(PY) -m pytest tests/chart

integration: tools
	$(PY) -m pytest tests/integration

# The whole suite, the CUDA worker image included (cached by content: minutes only when its
# inputs change); a bare `pytest` builds it only when asked or already cached.
test: tools lint
	PREFECT_GPU_OPERATOR_CUDA_IMAGE=1 $(PY) -m pytest

demo: tools
	$(BIN)/prefect-gpu-sandbox demo
