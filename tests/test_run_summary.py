"""A run says what it is and what it will cost, through the real loop."""

import logging
from pathlib import Path

from covidct.run import train
from tests.helpers import FAST, compose_experiment


def test_a_run_announces_itself_and_estimates_its_time(phantom_root: Path, tmp_path: Path, caplog):
    overrides = [f"data.root={phantom_root}", *FAST, "trainer.max_epochs=2", "callbacks.run_summary.estimate_after=1"]
    with caplog.at_level(logging.INFO, logger="covidct.run"):
        train(compose_experiment("ours", overrides), tmp_path)
    text = caplog.text
    assert "run: experiment ours, method Ours" in text
    assert "site A: train " in text and "site B: train " in text and "test " in text
    assert "device cpu (1 process(es)), precision 32-true" in text
    assert "2 steps per epoch, epochs 0..1" in text and f"folder {tmp_path.resolve()}" in text
    # timed over step 2 alone (step 1 sets things up): the rest of epoch 0 (none) and epoch 1 (2 steps)
    assert "estimated training time left:" in text and "2 steps to go" in text
    assert text.count("estimated training time left") == 1
