"""The mutation fuzzer (see :mod:`tests.fuzz.fuzzer`): every mutated model gets a clean
one-line error or an equivalent fold, within the per-case time limit.

Small profile (``make test``): 200 seeded cases (~2 s). Large profile, ``slow``:

    .venv/bin/python -m pytest tests/fuzz -m slow -s          # 5,000 cases (~45 s)
    BNFOLD_FUZZ_CASES=20000 .venv/bin/python -m pytest tests/fuzz -m slow -s

Cases are numbered; a failure names its number, and ``mutate(n, seeds())`` rebuilds it.
"""

from __future__ import annotations

import os

import pytest

from tests.fuzz.fuzzer import run_cases

SMALL_CASES = 200
LARGE_CASES = int(os.environ.get("BNFOLD_FUZZ_CASES", "5000"))


@pytest.mark.filterwarnings("ignore")
def test_fuzz_small(tmp_path):
    campaign = run_cases(range(SMALL_CASES), tmp_path)
    print(campaign.summary())
    assert campaign.failures == []
    assert sum(campaign.outcomes.values()) == SMALL_CASES
    # the fuzzer must reach the fold, not only the parser
    assert sum(v for k, v in campaign.outcomes.items() if k.startswith("folded + validated")) >= 10


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_fuzz_large(tmp_path):
    # numbered after the small profile's cases, so the two never repeat each other
    campaign = run_cases(range(SMALL_CASES, SMALL_CASES + LARGE_CASES), tmp_path)
    print(campaign.summary())
    assert campaign.failures == [], "\n".join(campaign.failures[:20])
