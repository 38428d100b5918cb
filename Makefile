# finetune-operator — every developer and CI entry point.
# Two commands do all set-up on a fresh machine:  `make run`  and  `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON_BOOT ?= python3.11
VENV        ?= .venv
PY          := $(VENV)/bin/python
# Build outputs (control-plane binaries, MinIO, HF cache seed) keyed by version; git-ignored.
export FT_CACHE ?= $(CURDIR)/.cache
export HF_HUB_OFFLINE ?= 1
export HF_HOME ?= $(FT_CACHE)/hf
export TOKENIZERS_PARALLELISM ?= false
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: help venv lock run test test-fast test-productnode test-unit lint deps crds chart-crds api-docs binaries cluster-up cluster-down bench clean \
	images images-docker images-prune kind-up kind-load kind-demo kind-down

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

# --compile-bytecode: uv installs no .pyc by default, and where PYTHONDONTWRITEBYTECODE=1 (CI, this machine) every
# Python process -- pytest, the operator, each trainer and Ray worker -- would compile torch, transformers and ray
# from source again (`import torch, transformers, ray.train, peft`: 26.6 s user without .pyc, 9.8 s with).
$(VENV)/.installed: requirements.lock pyproject.toml
	@command -v uv >/dev/null || $(PYTHON_BOOT) -m pip install -q uv==0.13.8
	@test -x $(PY) || uv venv -q -p $(PYTHON_BOOT) $(VENV)
	uv pip sync -q --compile-bytecode -p $(PY) requirements.lock
	uv pip install -q -p $(PY) --no-deps -e .
	@touch $@

venv: $(VENV)/.installed ## create .venv from requirements.lock (uv; cached wheels make it fast)

lock: ## re-pin every dependency into requirements.lock
	uv pip compile -q -p $(PYTHON_BOOT) pyproject.toml --extra trainer --extra operator --extra dev -o requirements.lock

run: venv ## fine-tune examples/quickstart.yaml locally (no cluster) and print SST-2 dev accuracy
	$(PY) -m finetune_trainer.hfcache seed
	$(VENV)/bin/finetune run examples/quickstart.yaml

lint: venv ## ruff + mypy --strict + import contracts
	$(VENV)/bin/ruff check operator trainer devcluster tests bench hack
	$(VENV)/bin/ruff format --check operator trainer devcluster tests bench hack
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy bench  # scripts, not a package: checked on their own (strict, same settings)
	$(VENV)/bin/lint-imports

test-unit: venv ## fast pure-function tests only
	$(PY) -m pytest tests/unit -q

test: venv deps binaries lint ## the whole suite: lint, unit, integration (real control plane), e2e, real node
	$(PY) -m pytest -q --durations=30 -m "not productnode"

test-productnode: venv deps binaries ## the product on the real node: quick start via helm + images, faults in real containers
	$(PY) -m pytest -q --durations=0 -m productnode

# The inner loop: pure tests + everything that needs only the control plane (kwok for pods whose life the test
# drives). No Ray, no real node, no image builds.
FAST_MARKERS := not ray and not realnode and not images and not slow
test-fast: venv deps binaries ## unit + integration without Ray or a node (the inner loop, a few minutes)
	$(PY) -m pytest -q --durations=15 tests/unit tests/integration -m "$(FAST_MARKERS)"

deps: ## install the Debian packages the tests and the dev cluster need (as root; a no-op when present)
	bash hack/apt-deps.sh

binaries: ## build the control plane, the real node's binaries, kwok, helm and minio from upstream Go modules (cached)
	bash hack/build-binaries.sh

NODES ?= 1
cluster-up: venv deps binaries ## control plane + NODES real nodes (kubelet, containerd, kube-proxy, CoreDNS); writes .cluster/kubeconfig
	$(PY) -m devcluster up --nodes $(NODES)

cluster-down: ## stop everything cluster-up started; leaves no process, mount, netns, veth, iptables rule or cgroup
	$(PY) -m devcluster down

bench: venv ## print benchmark figures (see bench/; bench/sst2_full.py takes hours and runs only by hand)
	@for b in $(filter-out bench/sst2_full.py,$(wildcard bench/*.py)); do echo "== $$b"; $(PY) $$b || exit 1; done

crds: venv ## regenerate crds/, the chart's CRD copy and deploy/rbac.yaml from the typed models
	$(VENV)/bin/finetune crd > crds/finetune.dev_finetunejobs.yaml
	cp crds/finetune.dev_finetunejobs.yaml charts/finetune-operator/files/crds/finetune.dev_finetunejobs.yaml
	$(PY) -m finetune_operator.rbac > deploy/rbac.yaml
	$(PY) -m finetune_operator.rbac kueue > deploy/rbac-kueue.yaml

chart-crds: crds ## alias: the chart installs AND upgrades the CRD from files/crds/

api-docs: venv ## regenerate docs/api-reference.md from the spec models
	$(PY) hack/gen_api_docs.py

images: venv ## build every image with buildah, no Docker (IMAGES="operator trainer" for some); cached by content hash
	$(PY) -m devcluster.images build $(IMAGES)

images-docker: ## build operator + trainer (cpu, cuda) release images with a Docker engine (exits 3 without one)
	bash hack/images.sh

images-prune: venv ## drop all but the newest tags of each image from buildah's storage and the OCI layout
	$(PY) -m devcluster.images prune

kind-up: ## kind cluster from kind-config.yaml (1 control plane + 2 CPU workers); needs Docker + kind
	bash hack/kind-demo.sh up

kind-load: ## load the operator and CPU trainer images into kind (after make images-docker)
	bash hack/kind-demo.sh load

kind-demo: venv ## MinIO, chart, SST-2 subset, quick-start job; waits for Succeeded; lists artifacts
	bash hack/kind-demo.sh demo

kind-down: ## delete the kind cluster
	bash hack/kind-demo.sh down

clean: ## remove local runs and caches of this checkout (not the shared build cache)
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
