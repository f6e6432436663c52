"""Fixtures and the test session's environment. Shared helpers (models, data) are plain
functions in ``helpers.py``, imported from there."""
from __future__ import annotations

import os

import pytest
import torch

from helpers import gaussian_blobs

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(1)  # tiny tensors: extra OpenMP threads only spin on a 2-core (often shared) CPU


@pytest.fixture
def blobs():
    """40 training and 20 validation samples of :func:`gaussian_blobs` in 8-D."""
    return gaussian_blobs(40, 20, 8)
