"""Shared test settings: Triton kernels run under the CPU interpreter where there is no GPU, and
GPU tests skip there (they are never deleted)."""

import os

import pytest
import torch

# Triton decides at decoration time whether a kernel is interpreted, so on a CPU-only machine the
# interpreter must be on before any kernel module is imported: conftest is imported first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# The HTTP API tests' shared fixtures. Defined here, not imported into each module: an imported
# fixture becomes one definition per module (a session-scoped one then built once per module).
# api_fixtures is imported inside them because on a GPU machine without the HTTP stack it skips
# whatever imports it — here, only the tests that ask for these fixtures.
@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random-weight tiny model written once a session."""
    from nsa_serve.model.init_model import init_model

    return init_model(tmp_path_factory.mktemp("api-tiny"), "tiny", seed=0)


@pytest.fixture(scope="session")
def api_server(tiny_model_dir):
    """The shared server (api_fixtures.start_server): API key on, 512-token context."""
    from api_fixtures import start_server

    server = start_server(tiny_model_dir)
    yield server
    server.stop()
