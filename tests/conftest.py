"""Shared test helpers. The tests run against the source checkout even when flowdsl is not
installed (`pytest` from the repository root)."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

try:
    import flowdsl  # noqa: F401
except ImportError:  # not installed: use the checkout
    sys.path.insert(0, str(ROOT))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
