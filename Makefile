# Meshward developer entry points. The README's two commands are `make dev` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install host-deps control-plane kind-images dev down dev-local down-local lint test test-unit crds bench clean help

help:
	@echo "make dev        install, build, create a kind cluster, install the operator with Helm, apply examples"
	@echo "make down       delete make dev's kind cluster and put the host back as it was"
	@echo "make test       lint, then every test: unit, integration (local kube-apiserver), e2e (real pods on kind)"
	@echo "make test-unit  only the tests that need no cluster (-m 'not integration')"
	@echo "make dev-local  the local control plane (no pods) with the operator as a process; make down-local"
	@echo "make lint       ruff, mypy --strict, import-linter, CRD drift, helm lint"
	@echo "make crds       regenerate crds/ and the chart's CRDs from operator/api/schema.py"
	@echo "make down       stop the local cluster started by make dev"
	@echo "make bench      authorization (vs Envoy's native jwt_authn; needs wrk), issuance, policy propagation, a pod-to-pod hop (HTTP/1.1, gRPC, TCP) and a context chain (kind)"

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# Debian packages the kind tier needs (podman, buildah, mmdebstrap, ...): root, once.
host-deps:
	hack/install-host-deps

control-plane:
	hack/build-control-plane all

kind-images: install control-plane host-deps
	hack/build-kind all

dev: install control-plane host-deps
	hack/dev

down: install
	hack/dev down

dev-local: install control-plane
	hack/dev-local

down-local:
	hack/cluster down

crds: install
	$(BIN)/python -m meshward.operator.api.crdgen

lint: install
	hack/build-control-plane helm
	$(BIN)/ruff check operator sidecar src tests hack bench
	$(BIN)/mypy -p meshward -p tests
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m meshward.operator.api.crdgen --check
	"$$(hack/build-control-plane paths | sed -n 's/^helm=//p')" lint --strict charts/meshward
	$(BIN)/hadolint Dockerfile hack/images/echo/Dockerfile hack/images/compat/Dockerfile

# The fixtures build what is missing (control plane, kind, node image, images: cached).
test: lint host-deps
	$(BIN)/pytest

test-unit: install
	$(BIN)/pytest -m "not integration"

bench: install control-plane host-deps
	@command -v wrk >/dev/null || { echo "make bench needs wrk: apt-get install wrk"; exit 2; }
	$(BIN)/python bench/authz_inprocess.py
	$(BIN)/python bench/config_push_bench.py --old
	$(BIN)/python bench/authz_bench.py
	$(BIN)/python bench/issuance_bench.py
	$(BIN)/python bench/policy_bench.py
	$(BIN)/python bench/policy_scale_bench.py
	$(BIN)/python bench/egress_bench.py
	$(BIN)/python bench/mesh_hop_bench.py
	$(BIN)/python bench/context_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis .import_linter_cache .pytest-kind
