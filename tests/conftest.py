"""Shared fixtures: offline settings and small random datasets. The notebooks run at their
default sizes, the sizes students run (tests/test_notebooks.py)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
from helpers import random_cls_data, random_lm_data  # noqa: E402


@pytest.fixture
def lm_data():
    return random_lm_data(64)


@pytest.fixture
def cls_data():
    return random_cls_data(64)
