"""nsa-loadtest: drive an OpenAI-compatible server with synthetic, long-document and needle
workloads, or a dataset file's requests, and report vLLM bench-serve compatible metrics (JSON, PNG plots, a stdout table).

Installed as the import package `nsa_loadtest`; the command is `nsa-loadtest` (see docs/loadtest.md).
It depends on nothing in `nsa_serve`, so it measures any OpenAI-compatible server the same way.
"""

__all__ = ["__version__"]
__version__ = "0.1.0"
