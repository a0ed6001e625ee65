"""Shared fixtures, and the hypothesis profiles: `ci` (the default) draws the same examples on every
run, so a run is reproducible and never fails on a case an earlier run did not draw, and sets no
per-example deadline (times belong to benchmarks, not tests); `explore` draws fresh examples (1000
where a test does not set its own count) to look for new counterexamples:
`HYPOTHESIS_PROFILE=explore python -m pytest`."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None)
settings.register_profile("explore", derandomize=False, deadline=None, max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def one_torch_thread():
    """Small tensors: one intra-op thread is faster and steadier on a shared two-core machine."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
