"""HTTP: the protocol class, the middleware, the model, operations, admin and docs routes, errors."""
