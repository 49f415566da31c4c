"""mmkit: build, size, fit, train and honestly compare multimodal PyTorch models."""

__version__ = "0.1.0"
