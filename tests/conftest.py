"""Fixtures shared by every test. The packages (spider, analysis, app, bench) are installed
editable (scripts/setup.sh); helper modules beside tests (tests/spider/ties.py) are found
the way pytest finds them (the folder of a test module without ``__init__.py``)."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one thread is as fast, and immune to a busy machine (two OpenMP threads
    sharing two loaded cores can be 30x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
