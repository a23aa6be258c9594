import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# a fresh Inductor cache per test session: passes must run (not be served from an older cache);
# spawned ranks inherit it
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="rd-inductor-"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
