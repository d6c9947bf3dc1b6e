"""Fixtures of the bench tests: the tiny workloads, built once per session."""

from __future__ import annotations

import pytest

from bench import workloads


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("bench-cache")


@pytest.fixture(scope="session")
def tiny(cache):
    return workloads.model_path(workloads.lookup("tiny-resnet"), cache)


@pytest.fixture(scope="session")
def tiny16(cache):
    return workloads.model_path(workloads.lookup("tiny-resnet-fp16"), cache)


@pytest.fixture(scope="session")
def tiny_ext(cache):
    return workloads.model_path(workloads.lookup("tiny-wide-ext"), cache)
