"""Shared test setup: make the repo's helpers importable without installing them."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT / "hack", ROOT / "tests", ROOT / "operator", ROOT / "inference_image"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
