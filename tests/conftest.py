"""Shared test settings: the test machine has 2 cores shared with other workers."""

import numpy as np
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def seed() -> int:
    """Seed torch and numpy globally; returns the seed."""
    torch.manual_seed(0)
    np.random.seed(0)
    return 0
