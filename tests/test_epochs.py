"""Every epoch draws a new order and new augmentations, through the real loop: a plain fit, a run killed
mid-epoch and resumed, and 2-process DDP. Asserted on what the model received in `on_train_batch_start`."""

from collections import Counter
from pathlib import Path

import pytest

from tests.helpers import FAST, cli_env, read_seen, run_cli

pytestmark = pytest.mark.slow  # three CLI trainings of 3 epochs, one killed and resumed, one DDP

EPOCHS = 3
# full phantom epochs (4 x 36 site-B images in steps of 4 + 4), so whole epochs can be compared
ARGS = [o for o in FAST if not o.startswith(("trainer.max_epochs", "trainer.limit_train_batches"))] + [
    f"trainer.max_epochs={EPOCHS}",
    "model._target_=tests.helpers.RecordingJoint",
]


def _fit(phantom_root: Path, outputs: Path, seen: Path, extra: list[str] = (), die_at: str | None = None):
    seen.mkdir(parents=True, exist_ok=True)
    env = {**cli_env(outputs), "COVIDCT_TEST_SEEN": str(seen)}
    if die_at:
        env["COVIDCT_TEST_DIE_AT"] = die_at
    return run_cli(["experiment=joint", f"data.root={phantom_root}", *ARGS, *extra], outputs, env=env)


def _draws(batches: list[dict]) -> Counter:
    """The epoch's (file, augmented pixels) draws, as a multiset."""
    return Counter((f, p) for b in batches for f, p in zip(b["files"], b["pixels"]))


@pytest.fixture(scope="module")
def straight(phantom_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict]]:
    root = tmp_path_factory.mktemp("straight")
    result = _fit(phantom_root, root / "out", root / "seen")
    assert result.returncode == 0, result.stderr[-3000:]
    return read_seen(root / "seen")


def test_consecutive_epochs_differ_in_order_and_augmentation(straight: dict[int, list[dict]]):
    assert sorted(straight) == list(range(EPOCHS))
    for epoch in range(1, EPOCHS):
        before, now = straight[epoch - 1], straight[epoch]
        assert len(now) == len(before)
        assert [b["files"] for b in now] != [b["files"] for b in before], "the same order again"
        shared = sum((_draws(now) & _draws(before)).values())
        assert shared < 0.1 * sum(_draws(now).values()), f"epoch {epoch} replays {shared} augmented views"
        # each site-B image is still shown 4 times per epoch
        counts_b = Counter(f for b in now for f in b["files"][4:])
        assert min(counts_b.values()) == 4


def test_a_run_killed_mid_epoch_resumes_into_the_epoch_an_uninterrupted_run_sees(
    phantom_root: Path, tmp_path: Path, straight: dict[int, list[dict]]
):
    killed = _fit(phantom_root, tmp_path / "out", tmp_path / "killed", die_at="1:5")
    assert killed.returncode == 137, killed.stderr[-3000:]
    before_kill = read_seen(tmp_path / "killed")
    assert before_kill[0] == straight[0] and before_kill[1] == straight[1][:6]  # batch 5 was received, then the kill

    resumed = _fit(phantom_root, tmp_path / "out", tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    after = read_seen(tmp_path / "resumed")
    assert sorted(after) == [1, 2]  # epoch 0's checkpoint was kept; epoch 1 is run again from its start
    assert after[1] == straight[1] and after[2] == straight[2]


def test_ddp_ranks_draw_new_disjoint_shares_of_each_epoch(
    phantom_root: Path, tmp_path: Path, straight: dict[int, list[dict]]
):
    result = _fit(phantom_root, tmp_path / "out", tmp_path / "seen", ["trainer=ddp", "trainer.max_epochs=2"])
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [read_seen(tmp_path / "seen", rank) for rank in (0, 1)]
    for epoch in (0, 1):
        # the epoch's batches are dealt round-robin: rank r gets batches r, r + 2, ... of the one-process epoch
        for rank in (0, 1):
            assert ranks[rank][epoch] == [{**b, "batch": k} for k, b in enumerate(straight[epoch][rank::2])], (
                f"rank {rank}, epoch {epoch}"
            )
        # so together the ranks see every batch of the epoch exactly once (disjoint shares)
        together = [{k: b[k] for k in ("files", "pixels")} for b in ranks[0][epoch] + ranks[1][epoch]]
        assert sorted(map(str, together)) == sorted(
            str({k: b[k] for k in ("files", "pixels")}) for b in straight[epoch]
        )
    for rank in (0, 1):
        assert [b["files"] for b in ranks[rank][1]] != [b["files"] for b in ranks[rank][0]]
