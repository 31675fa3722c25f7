"""nsa-serve: an inference server for Native Sparse Attention language models."""

__version__ = "0.1.0"
