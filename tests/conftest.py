"""Shared fixtures: offline settings, CI-sized notebook parameters, small random datasets."""

import os

os.environ.setdefault("ACCUMLAB_CI", "1")  # notebooks read this in their parameters cell
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
