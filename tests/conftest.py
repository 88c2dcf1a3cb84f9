from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"


@pytest.fixture(autouse=True)
def _two_threads():
    # CI machines have 2 cores; pinning keeps timings and float noise predictable.
    torch.set_num_threads(2)
    yield
