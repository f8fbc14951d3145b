import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the benchmark folder holds the plain transcription of SPIDER's rule that tests compare with
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one thread is as fast, and immune to a busy machine (two OpenMP threads
    sharing two loaded cores can be 30x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
