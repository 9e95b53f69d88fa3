from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("COVIDCT_SHARED_DATA", REPO.parent / "shared" / "data"))

# One decode cache for the whole session (subprocesses inherit it), never inside ../shared.
# It holds about 1 GB of decoded images, so the session removes it at the end unless the caller chose it.
_OWN_CACHE = None if "COVIDCT_CACHE" in os.environ else tempfile.mkdtemp(prefix="covidct-test-cache-")
if _OWN_CACHE:
    os.environ["COVIDCT_CACHE"] = _OWN_CACHE
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not (SHARED_DATA / "sars-cov-2").is_dir():
        pytest.fail(f"the real data is expected at {SHARED_DATA} (set COVIDCT_SHARED_DATA to override)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.phantoms import make_phantom_root

    return make_phantom_root(tmp_path_factory.mktemp("phantoms"))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
