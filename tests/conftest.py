import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")
if "PYTEST_XDIST_WORKER" in os.environ:  # several workers share the cores: one thread each, children too
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def builtin_data(tmp_path_factory):
    """The builtin corpus tokenized once per test session (a private cache, so tests never share state)."""
    from megavq.data import prepare_data
    return prepare_data("builtin", cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module", autouse=True)
def _registries():
    """A test module that registers a plugin router or dispatcher leaves the registries as it found them, so no
    other module sees it, whichever worker or order runs them (importing the packages registers the built-ins)."""
    from megavq.moe.dispatch.base import DISPATCHERS
    from megavq.moe.routers.base import ROUTERS
    saved = {registry: dict(registry.classes) for registry in (ROUTERS, DISPATCHERS)}
    yield
    for registry, classes in saved.items():
        registry.classes = classes
