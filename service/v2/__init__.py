"""The Open Inference Protocol v2: the codec, the data plane, and its REST and gRPC transports."""
