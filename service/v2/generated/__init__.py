"""Generated from inference.proto by scripts/gen-grpc.sh; not edited by hand."""
