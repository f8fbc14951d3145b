import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the benchmark folder holds the plain transcription of SPIDER's rule that tests compare with
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
