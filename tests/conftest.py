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
# DeepSpeed JIT-builds its CPU shm op at init_distributed (the trainer skips it; the tests that call
# deepspeed.init_distributed themselves build it) into one cache per Python version; two
# checkouts' venvs sharing it rebuild it in turn, and a build killed half-way leaves a lock that
# hangs every later multi-rank test. One cache per venv (inherited by the test subprocesses).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
