import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one torch thread per xdist worker: the workers share the machine's cores
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
