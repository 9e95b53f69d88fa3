"""Adding a method is one method file and one experiment YAML: a toy tenth method, outside the package and
its conf/, trains through the CLI, writes a run record and is reported after the paper's rows."""

import json
import os
from pathlib import Path

import pytest
import torch

from tests.helpers import FAST, REPO, cli_env, run_cli

pytestmark = pytest.mark.slow  # two trainings and a report through the CLI

METHOD_FILE = '''
"""Joint with label smoothing: the toy method a newcomer adds."""

import torch.nn.functional as F

from covidct.methods import SiteMethod
from covidct.models.routing import batch_sites


class LabelSmoothing(SiteMethod):
    def __init__(self, smoothing: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        self.net = self.make_backbone()

    def training_losses(self, batch):
        logits = self.net(batch["image"], batch_sites(batch))
        ce = F.cross_entropy(logits, batch["label"], label_smoothing=self.hparams.smoothing)
        return {"loss": ce, "ce": ce}

    def logits(self, image, sites):
        return self.net(image, sites)
'''

EXPERIMENT_FILE = """# @package _global_
# A toy method: SepNorm's backbone, label-smoothed cross-entropy. No Table I row: reported after the table.
defaults:
  - override /model: default

model:
  _target_: toy_method.LabelSmoothing
  smoothing: 0.2
  backbone:
    num_sites: ${num_sites:${data.sites}}
"""


def test_a_toy_tenth_method_trains_records_and_is_reported(phantom_root: Path, tmp_path: Path):
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "toy_method.py").write_text(METHOD_FILE)
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "toy.yaml").write_text(EXPERIMENT_FILE)
    runs = tmp_path / "runs"
    env = {**cli_env(runs), "PYTHONPATH": os.pathsep.join([str(tmp_path / "code"), str(REPO)])}
    common = [f"data.root={phantom_root}", *FAST, "-m"]
    toy = run_cli(["experiment=toy", f"hydra.searchpath=[file://{tmp_path / 'conf'}]", *common], runs, env=env)
    assert toy.returncode == 0, toy.stderr[-3000:]
    assert "litlogger" not in toy.stdout + toy.stderr and "LeafSpec" not in toy.stderr  # known noise silenced
    ours = run_cli(["experiment=ours", *common], runs, env=env)
    assert ours.returncode == 0, ours.stderr[-3000:]

    (record_path,) = runs.glob("toy/fold0-seed643-*/metrics.json")
    record = json.loads(record_path.read_text())
    assert record["run"]["experiment"] == "toy" and record["config"]["model"]["smoothing"] == 0.2
    assert set(record["test"]["last"]["images"]) == {"A", "B"}
    checkpoint = record_path.with_name("checkpoints") / "last.ckpt"
    assert torch.load(checkpoint, weights_only=False)["covidct"]["method"] == "toy_method.LabelSmoothing"

    tables = tmp_path / "tables"
    report = run_cli(
        ["--runs", str(runs), "--out", str(tables), "--protocol", "smoke", "--folds", "0", "--seeds", "643"],
        runs,
        env=env,
        module="covidct.report",
    )
    assert report.returncode == 0, report.stderr[-3000:]
    table = (tables / "table1.md").read_text()
    assert "| toy |" in table, table  # its own row, labelled by its name, after the paper's rows
    assert table.index("| SepNorm + Contrastive (ours) |") < table.index("| toy |")
