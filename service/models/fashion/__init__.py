"""The Fashion-MNIST classifier: its predictor, and the upload decoding that turns photos into its 28x28
convention (images.py)."""

from service.models.fashion.predictor import NAMES_ZH, Fashion, FashionImage, FashionPrediction

__all__ = ["NAMES_ZH", "Fashion", "FashionImage", "FashionPrediction"]
