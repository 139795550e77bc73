#!/usr/bin/env bash
# Regenerate the gRPC modules of the v2 protocol from service/v2/generated/inference.proto (needs grpcio-tools),
# with inference_pb2.pyi: the message types for mypy (the .py builds its classes at run time).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -I service/v2/generated --python_out=service/v2/generated --pyi_out=service/v2/generated \
    --grpc_python_out=service/v2/generated \
    service/v2/generated/inference.proto
# the generated service module imports its messages as a top-level module; make it a package import
sed -i 's/^import inference_pb2 as/from service.v2.generated import inference_pb2 as/' service/v2/generated/inference_pb2_grpc.py
