"""Every epoch draws a new order and new augmentations, through the real loop: a plain fit, runs killed or
stopped with Ctrl-C mid-epoch and resumed, and 2-process DDP. Asserted on what the model received in
`on_train_batch_start`, and on the records."""

import json
import os
import signal
import subprocess
import sys
import time
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


def test_ctrl_c_mid_epoch_saves_the_step_and_the_rerun_gives_the_uninterrupted_record(
    phantom_root: Path, tmp_path: Path, straight: Straight
):
    seen = tmp_path / "stopped"
    seen.mkdir()
    args = ["experiment=joint", f"data.root={phantom_root}", *ARGS, "data.num_workers=2"]
    env = {**cli_env(tmp_path / "out"), "COVIDCT_TEST_SEEN": str(seen)}
    with (tmp_path / "stderr.txt").open("w") as stderr:
        process = subprocess.Popen(  # a session of its own: Ctrl-C reaches its whole process group, workers too
            [sys.executable, "-m", "covidct.run", *args], cwd=REPO, env=env, stderr=stderr, start_new_session=True
        )
    try:
        deadline = time.time() + 300
        while not (seen / "rank0.jsonl").is_file() or len((seen / "rank0.jsonl").read_text().splitlines()) < 40:
            assert process.poll() is None and time.time() < deadline, "the run ended before batch 40"
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    message = (tmp_path / "stderr.txt").read_text()
    assert process.returncode == 128 + signal.SIGINT, message[-3000:]
    assert "error: stopped by Ctrl-C (SIGINT) after batch" in message and "Traceback" not in message
    (folder,) = (tmp_path / "out" / "joint").iterdir()
    step = torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]
    stopped = read_seen(seen)
    assert 36 < step < 72 and sum(map(len, stopped.values())) == step  # every step it took is in the checkpoint

    resumed = _fit(phantom_root, tmp_path / "out", tmp_path / "resumed", ["data.num_workers=2"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"batch {step - 36 + 1} (step {step})" in resumed.stdout + resumed.stderr
    after = read_seen(tmp_path / "resumed")
    assert after[1] == straight.seen[1][step - 36 :] and after[2] == straight.seen[2]
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
