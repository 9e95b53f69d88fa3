"""Every epoch draws a new order and new augmentations, through the real loop: a plain fit, runs killed or
stopped with Ctrl-C mid-epoch and resumed, and 2-process DDP. Asserted on what the model received in
`on_train_batch_start`, and on the records."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from tests.helpers import FAST, REPO, cli_env, read_seen, run_cli

pytestmark = pytest.mark.slow  # CLI trainings of 3 epochs: straight, killed or stopped and resumed, DDP

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


def _results(outputs: Path) -> tuple[dict, bytes]:
    """The one run's test results and predictions.csv under OUTPUTS."""
    (folder,) = (outputs / "joint").iterdir()
    return json.loads((folder / "metrics.json").read_text())["test"], (folder / "predictions.csv").read_bytes()


class Straight(NamedTuple):
    seen: dict[int, list[dict]]
    results: tuple[dict, bytes]


def _draws(batches: list[dict]) -> Counter:
    """The epoch's (file, augmented pixels) draws, as a multiset."""
    return Counter((f, p) for b in batches for f, p in zip(b["files"], b["pixels"]))


@pytest.fixture(scope="module")
def straight(phantom_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Straight:
    """An uninterrupted run, without loader workers."""
    root = tmp_path_factory.mktemp("straight")
    result = _fit(phantom_root, root / "out", root / "seen")
    assert result.returncode == 0, result.stderr[-3000:]
    return Straight(read_seen(root / "seen"), _results(root / "out"))


def test_consecutive_epochs_differ_in_order_and_augmentation(straight: Straight):
    straight = straight.seen
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
    phantom_root: Path, tmp_path: Path, straight: Straight
):
    # with loader workers, which prefetch as soon as Lightning asks for the iterator of a resumed epoch
    workers = ["data.num_workers=2"]
    killed = _fit(phantom_root, tmp_path / "out", tmp_path / "killed", workers, die_at="1:5")
    assert killed.returncode == 137, killed.stderr[-3000:]
    before_kill = read_seen(tmp_path / "killed")
    # batch 5 arrived, then the kill
    assert before_kill[0] == straight.seen[0] and before_kill[1] == straight.seen[1][:6]
    (folder,) = (tmp_path / "out" / "joint").iterdir()
    log = (folder / "run.log").read_text()  # written as the run went, though it never ended
    assert "run: experiment joint" in log and "epoch 1/3 done in" in log and "epoch 2/3 done" not in log

    resumed = _fit(phantom_root, tmp_path / "out", tmp_path / "resumed", workers)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at the start of epoch 2/3" in resumed.stdout + resumed.stderr
    after = read_seen(tmp_path / "resumed")
    assert sorted(after) == [1, 2]  # epoch 0's checkpoint was kept; epoch 1 is run again from its start
    assert after[1] == straight.seen[1] and after[2] == straight.seen[2]
    assert _results(tmp_path / "out") == straight.results


def test_a_kill_after_a_timed_checkpoint_resumes_at_the_next_batch_to_the_uninterrupted_record(
    phantom_root: Path, tmp_path: Path, straight: Straight
):
    timed = ["data.num_workers=2", "callbacks.last_checkpoint.every_minutes=0"]  # due after every step
    killed = _fit(phantom_root, tmp_path / "out", tmp_path / "killed", timed, die_at="1:5")
    assert killed.returncode == 137, killed.stderr[-3000:]

    resumed = _fit(phantom_root, tmp_path / "out", tmp_path / "resumed", timed)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at epoch 2/3, batch 6 (step 41)" in resumed.stdout + resumed.stderr  # 36 + 5 steps were saved
    after = read_seen(tmp_path / "resumed")
    assert after[1] == straight.seen[1][5:] and after[2] == straight.seen[2]  # the same batches, from batch 5
    assert _results(tmp_path / "out") == straight.results


def test_a_rerun_of_a_run_killed_before_its_first_checkpoint_says_it_starts_from_step_0(
    phantom_root: Path, tmp_path: Path
):
    killed = _fit(phantom_root, tmp_path / "out", tmp_path / "killed", die_at="0:3")
    assert killed.returncode == 137, killed.stderr[-3000:]
    rerun = _fit(phantom_root, tmp_path / "out", tmp_path / "rerun")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    said = rerun.stdout + rerun.stderr
    assert "holds an interrupted run that left no checkpoint" in said and "starting from step 0" in said
    assert "resuming from" not in said and read_seen(tmp_path / "rerun")[0][0]["batch"] == 0


def _stopped_run(phantom_root: Path, tmp_path: Path, at: str) -> subprocess.CompletedProcess:
    """A run that sends itself a signal at EPOCH:BATCH:SIGNAL, in a session of its own: like Ctrl-C, the
    signal reaches its whole process group, loader workers too."""
    seen = tmp_path / "stopped"
    seen.mkdir()
    args = ["experiment=joint", f"data.root={phantom_root}", *ARGS, "data.num_workers=2"]
    env = {**cli_env(tmp_path / "out"), "COVIDCT_TEST_SEEN": str(seen), "COVIDCT_TEST_SIGNAL_AT": at}
    return subprocess.run(
        [sys.executable, "-m", "covidct.run", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        start_new_session=True,
    )


@pytest.mark.parametrize("name, status", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_mid_epoch_saves_the_step_and_the_rerun_gives_the_uninterrupted_record(
    phantom_root: Path, tmp_path: Path, straight: Straight, name: str, status: int
):
    stopped = _stopped_run(phantom_root, tmp_path, f"1:5:{name}")  # while batch 5 of epoch 1 is trained
    assert stopped.returncode == status, stopped.stderr[-3000:]
    assert f"stopped by {'Ctrl-C (SIGINT)' if name == 'SIGINT' else 'SIGTERM'} after batch 6/36 of epoch 2/3" in (
        stopped.stderr
    )
    assert "Traceback" not in stopped.stderr
    (folder,) = (tmp_path / "out" / "joint").iterdir()
    checkpoint = torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 36 + 6  # the step in progress was finished and saved

    resumed = _fit(phantom_root, tmp_path / "out", tmp_path / "resumed", ["data.num_workers=2"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at epoch 2/3, batch 7 (step 42)" in resumed.stdout + resumed.stderr
    after = read_seen(tmp_path / "resumed")
    assert after[1] == straight.seen[1][6:] and after[2] == straight.seen[2]
    assert _results(tmp_path / "out") == straight.results
    timing = json.loads((folder / "timing.json").read_text())["train_epochs"]
    assert [e["batches"] for e in timing] == [30, 36] and all(e["seconds"] < 600 for e in timing)


def test_ctrl_c_in_the_last_step_stops_after_training_and_the_rerun_only_tests(
    phantom_root: Path, tmp_path: Path, straight: Straight
):
    stopped = _stopped_run(phantom_root, tmp_path, "2:35:SIGINT")
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert "stopped by Ctrl-C (SIGINT) at the end of training (epoch 3/3)" in stopped.stderr
    (folder,) = (tmp_path / "out" / "joint").iterdir()
    assert not (folder / "metrics.json").exists()
    rerun = _fit(phantom_root, tmp_path / "out", tmp_path / "rerun", ["data.num_workers=2"])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "at the end of training (step 108): testing only" in rerun.stdout + rerun.stderr
    assert not (tmp_path / "rerun" / "rank0.jsonl").exists()  # no training step
    assert _results(tmp_path / "out") == straight.results


def test_ddp_ranks_draw_new_disjoint_shares_of_each_epoch(phantom_root: Path, tmp_path: Path, straight: Straight):
    straight = straight.seen
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
