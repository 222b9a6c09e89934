import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("NUMBA_CACHE_DIR", str(ROOT / ".numba_cache"))

SHARED_DATA = Path(os.environ.get("LOOKALIKE_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (the project's real test data); tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (set LOOKALIKE_SHARED_DATA to its folder)")
    return SHARED_DATA


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"needs {path}, which is absent")
    return path


def pytest_configure(config):
    # The tiny test runs (--max-steps 2) are incomplete on purpose, so every load of their exports would warn;
    # tests/test_incomplete_runs.py asserts the warning (pytest.warns records it despite this filter).
    config.addinivalue_line("filterwarnings", "ignore::engine.encoder.IncompleteModelWarning")
