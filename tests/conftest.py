"""Fixtures and the test session's environment. Shared helpers (models, data) are plain
functions in ``helpers.py``, imported from there."""
from __future__ import annotations

import os

import pytest
import torch

from helpers import digits_mlp, gaussian_blobs
from tasks import noisy_digits

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(1)  # tiny tensors: extra OpenMP threads only spin on a 2-core (often shared) CPU


@pytest.fixture
def blobs():
    """40 training and 20 validation samples of :func:`gaussian_blobs` in 8-D."""
    return gaussian_blobs(40, 20, 8)


@pytest.fixture(scope="session")
def digits():
    """The digits with 20 % symmetric label noise (seed 0) and a 64-64-10 MLP fit to them (audits
    copy the model, so the tests share one); a module may define its own ``digits`` instead."""
    split = noisy_digits(rate=0.2, seed=0)
    return split, digits_mlp(split)
