#!/usr/bin/env bash
# Regenerate the gRPC modules of the v2 protocol from service/v2_grpc/inference.proto (needs grpcio-tools).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -I service/v2_grpc --python_out=service/v2_grpc --grpc_python_out=service/v2_grpc \
    service/v2_grpc/inference.proto
# the generated service module imports its messages as a top-level module; make it a package import
sed -i 's/^import inference_pb2 as/from service.v2_grpc import inference_pb2 as/' service/v2_grpc/inference_pb2_grpc.py
