"""A run says what it is and what it will cost, through the real loop."""

import logging
import re
from pathlib import Path

import pytest

from covidct.training.fit import train
from tests.helpers import FAST, compose_experiment, run_cli


def test_a_run_announces_itself_and_estimates_its_time(phantom_root: Path, tmp_path: Path, caplog):
    overrides = [f"data.root={phantom_root}", *FAST, "trainer.max_epochs=2", "callbacks.run_summary.estimate_after=1"]
    with caplog.at_level(logging.INFO, logger="covidct.run"):
        train(compose_experiment("ours", overrides), tmp_path)
    text = caplog.text
    assert "run: experiment ours, method Ours" in text
    assert "site A: train " in text and "site B: train " in text and "test " in text
    assert "device cpu (1 process(es)), precision 32-true" in text
    assert "2 steps per epoch, epochs 1..2 of 2" in text and f"folder {tmp_path.resolve()}" in text
    # timed over step 2 alone (step 1 sets things up): the rest of epoch 1 (none) and epoch 2 (2 steps)
    assert "estimated training time left:" in text and "2 steps to go" in text
    assert text.count("estimated training time left") == 1
    # then a line per epoch, as it ends
    assert re.search(r"epoch 1/2 done in 0:\d\d, train loss \d\.\d{4}; training time left 0:\d\d", text)
    assert "epoch 2/2 done in" in text and "training time left 0:00" in text


@pytest.mark.slow
def test_the_progress_bar_shows_the_epoch_out_of_the_total_and_the_run_s_time_left(phantom_root: Path, tmp_path: Path):
    args = ["experiment=joint", f"data.root={phantom_root}", *FAST, "trainer.max_epochs=2"]
    result = run_cli([*args, "trainer.enable_progress_bar=true"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    bar = result.stdout  # Lightning writes its bars to stdout
    assert "Epoch 1/2" in bar and "Epoch 2/2" in bar and "Epoch 0" not in bar and "v_num" not in bar
    # from step 2 on (step 1 sets things up): the time left to the end of the run, 0 after its last step
    frames = re.split(r"[\r\n]", bar)
    assert not any("run left" in f for f in frames if re.match(r"Epoch 1/2: +50%", f))
    assert any(re.match(r"Epoch 1/2: +100%.*, run left=0:\d\d]", f) for f in frames)
    assert any(re.match(r"Epoch 2/2: +100%.*, run left=0:00]", f) for f in frames)


def test_without_a_bar_the_run_drops_the_progress_bar_callback(phantom_root: Path, tmp_path: Path):
    # FAST has enable_progress_bar=false: Lightning refuses a bar callback then, so the run must drop it
    train(compose_experiment("joint", [f"data.root={phantom_root}", *FAST]), tmp_path)
    assert (tmp_path / "metrics.json").is_file()
