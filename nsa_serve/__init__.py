"""nsa-serve: an inference server for Native Sparse Attention language models.

`from nsa_serve import LLM, SamplingParams` gives offline batched inference (nsa_serve/offline.py);
they load on first use, so `import nsa_serve` stays cheap for the CLI."""

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str):
    if name == "LLM":
        from .offline import LLM
        return LLM
    if name == "SamplingParams":
        from .engine.protocol import SamplingParams
        return SamplingParams
    raise AttributeError(f"module 'nsa_serve' has no attribute {name!r}")
