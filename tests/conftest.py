"""Fixtures shared by the whole suite."""

import numpy as np
import pytest


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded generator: every test sees the same numbers on every run."""
    return np.random.default_rng(20150211)  # Ioffe & Szegedy's arXiv submission date
