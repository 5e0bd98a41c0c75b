import pyro
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_clear():
    """Every test starts from the same RNG state and an empty Pyro param store."""
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    yield
