PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
PROTO_OUT := client/hotweights/wire/_proto

.PHONY: setup demo test check protos check-protos clean

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

protos:
	$(VPY) -m grpc_tools.protoc -Iproto --python_out=$(PROTO_OUT) --pyi_out=$(PROTO_OUT) \
		--grpc_python_out=$(PROTO_OUT) proto/hotweights/v1/hotweights.proto
	sed -i 's/^from hotweights.v1 import/from hotweights.wire._proto.hotweights.v1 import/' $(PROTO_OUT)/hotweights/v1/hotweights_pb2_grpc.py

check-protos: setup
	rm -rf /tmp/hw-protos && mkdir -p /tmp/hw-protos
	$(VPY) -m grpc_tools.protoc -Iproto --python_out=/tmp/hw-protos --pyi_out=/tmp/hw-protos \
		--grpc_python_out=/tmp/hw-protos proto/hotweights/v1/hotweights.proto
	sed -i 's/^from hotweights.v1 import/from hotweights.wire._proto.hotweights.v1 import/' /tmp/hw-protos/hotweights/v1/hotweights_pb2_grpc.py
	diff -r -x __init__.py -x __pycache__ /tmp/hw-protos/hotweights $(PROTO_OUT)/hotweights

clean:
	rm -rf $(VENV) .demo
