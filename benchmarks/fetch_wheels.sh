#!/usr/bin/env bash
# Downloads into .whl/ the wheels the GPU machine lacks (it has torch, cuda-bindings, grpcio, protobuf, typer,
# safetensors, transformers, xxhash, numpy, pytest, psutil). benchmarks/gpu_session.sh installs them there.
# Run from the repository root on a machine with network; .whl/ is git-ignored and travels as a carried path.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
WHEELS=(
  structlog==26.1.0                 # the daemon's logging
  grpcio-health-checking==1.84.0    # the daemon's gRPC health service
  grpcio-reflection==1.84.0         # the daemon's gRPC reflection service
  fastsafetensors==0.5.0            # peer (GDS / no-GDS loader)
  runai-model-streamer==0.16.1      # peer (newest with a manylinux x86_64 wheel here)
  humanize==4.15.0                  # runai-model-streamer's dependency
  instanttensor==0.2.2              # peer
  nvidia-cufile==1.19.1.55          # cuFile 1.19 for the GDS compatibility-mode test (the image has 1.15)
)
for w in "${WHEELS[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$w"
done
ls -la .whl
du -sh .whl
