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
# The pseudonym key (covidct/pseudonyms.py) of the session, never the user's own ~/.config/covidct one
_OWN_KEY_DIR = None if "COVIDCT_PSEUDONYM_KEY" in os.environ else tempfile.mkdtemp(prefix="covidct-test-key-")
if _OWN_KEY_DIR:
    os.environ["COVIDCT_PSEUDONYM_KEY"] = str(Path(_OWN_KEY_DIR) / "pseudonym.key")
# Under pytest-xdist (`make test`: a worker per core) one torch thread a worker: two one-thread workers train faster
# in total than one worker with two threads, and more threads than cores slow everything down
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


def in_ci() -> bool:
    """CI sets CI=true (`.ci/run` does): there a test that cannot run is a failure, not a skip."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The shared copy of both sites. Missing: the test skips, or in CI fails (errors at set-up)."""
    if not (SHARED_DATA / "sars-cov-2").is_dir():
        message = f"the real data is not at {SHARED_DATA}; set COVIDCT_SHARED_DATA to its folder"
        if in_ci():
            pytest.fail(f"{message} (CI=true: the real-data tests must run)", pytrace=False)
        pytest.skip(message)
    return SHARED_DATA


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.phantoms import make_phantom_root

    return make_phantom_root(tmp_path_factory.mktemp("phantoms"))


# `make table1` end to end (nine trainings, then a rerun) and 2-process DDP through the CLI: these files
# import no pytest to mark themselves with
@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by it
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`real_data` on every test that requests the fixture, directly or through another fixture."""
    for item in items:
        if "real_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.real_data)


@pytest.hookimpl(trylast=True)  # after deselection: torch is imported only when a gpu test is left
def pytest_collection_finish(session: pytest.Session) -> None:
    """A `gpu` test (marked in its file) skips where there is no CUDA device."""
    gpu_items = [item for item in session.items if item.get_closest_marker("gpu")]
    if gpu_items:
        import torch

        if not torch.cuda.is_available():
            for item in gpu_items:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for own in (_OWN_CACHE, _OWN_KEY_DIR):
        if own:
            shutil.rmtree(own, ignore_errors=True)
