"""Datasets: built-in procedural sets, real-format loaders, the tensor-file format."""
