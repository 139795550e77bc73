"""The runtime: batching, the model registry and its versions, worker processes, metrics, memory."""
