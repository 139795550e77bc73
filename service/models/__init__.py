"""One module per served model (a ``Predictor`` subclass each); ``service/catalog.py`` lists them."""
