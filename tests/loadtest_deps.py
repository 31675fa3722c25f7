"""Imported first by the load tester's tests. The device machines' image lacks some of the load
tester's packages, and `pytest -m gpu tests/` must still collect there (none of these tests is a
GPU test): on a GPU machine the tests skip, naming the missing package, as the API tests do
(api_fixtures.py). Without a GPU (CI, a developer's machine) a missing package stays an import
error."""

import pytest
import torch

if torch.cuda.is_available():
    for _package in ("httpx", "tqdm", "matplotlib", "prometheus_client"):
        pytest.importorskip(_package, reason=f"the load tester needs {_package}, not installed on this GPU machine")
