import os
import sys

import pytest

# torchscale (reference RetNet) imports timm only for drop_path; real timm drags in torchvision
# and a CUDA torch, so tests use a tiny stand-in when timm is absent.
try:
    import timm.models.layers  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "_stubs"))

os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
