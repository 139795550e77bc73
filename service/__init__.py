"""The deployable model server: FastAPI app, registry, batching, metrics and one module per model."""
