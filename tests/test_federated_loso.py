"""Leave-one-site-out in a federation (data.test_sites), through the CLI and Flower's Simulation Runtime on phantoms:
a hospital that never trains is a node that only receives the final model, and classifies its images under each
norm choice its strategy leaves it, each checked against its definition computed by hand."""

import json
from pathlib import Path

import pytest
import torch

from covidct.checkpoints import read_checkpoint
from covidct.federated.sharing import batchnorm_keys
from covidct.records import read_predictions
from covidct.scoring import site_probabilities
from covidct.training.fit import build
from tests.helpers import FAST, compose_experiment, run_cli
from tests.phantoms import hospital_site_config, make_hospital_site, make_phantom_root

pytestmark = pytest.mark.slow  # each run starts Flower's runtime (Ray)
CHOICES = {
    "fedbn": ["adabn", "mean", "site:A", "site:B"],  # norms kept per site: the centralised per-site choices
    "silobn": ["adabn", "mean", "site:A", "site:B"],  # their statistics kept per site: the same choices
    "fedavg": ["shared"],  # every weight shared: the global model as it is
    "local": ["site:A", "site:B"],  # nothing shared: one site's network
}
HOSPITAL_IMAGES = 2 * 4 * 5


@pytest.fixture(scope="module")
def setting(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("federated-loso")
    root = make_phantom_root(base / "data", per_class=12)
    make_hospital_site(root)
    hospital_site_config(base / "conf")
    overrides = [
        f"data.root={root}",
        "data.sites=[A,B,hospital]",
        "data.test_sites=[hospital]",
        f"hydra.searchpath=[file://{base / 'conf'}]",
        "patient_ids=raw",  # files named as on disk, to pair them with the images read here
        *FAST,
        "trainer.max_epochs=2",  # 2 rounds (federated.rounds follows it; a multirun cannot set a node only some
        # of its experiments have)
    ]
    sweep = base / "sweep"
    result = run_cli(["-m", f"experiment={','.join(CHOICES)}", f"hydra.sweep.dir={sweep}", *overrides], base)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = {json.loads(p.read_text())["run"]["experiment"]: p.parent for p in sweep.rglob("metrics.json")}
    assert set(runs) == set(CHOICES)
    return {"runs": runs, "root": root}


def test_a_hospital_that_never_trains_gets_every_choice_its_strategy_leaves_it_each_by_its_definition(setting):
    """One test over one sweep of four runs (their set-up is most of this file's time, and pytest-xdist would
    set up a fixture shared by several tests once per worker)."""
    for experiment, run in setting["runs"].items():
        _check_unseen_record(experiment, run)
    _check_each_choice_is_its_definition(setting)
    _check_silobn_keeps_the_batchnorm_statistics_at_each_site_and_shares_the_rest(setting)


def _check_unseen_record(experiment: str, run: Path) -> None:
    record = json.loads((run / "metrics.json").read_text())
    last = record["test"]["last"]
    assert set(last["images"]) == {"A", "B"}  # the training sites' own test folds
    assert list(last["unseen"]) == CHOICES[experiment]
    for results in last["unseen"].values():
        assert set(results["images"]) == {"hospital"} and results["images"]["hospital"]["auc"] is not None
    assert record["run"]["splits"]["test_sites"] == ["hospital"]
    assert [sorted(sites) for sites in record["run"]["federated"]["per_round"]] == [["A", "B"], ["A", "B"]]
    assert not list((run / "federated" / "clients").glob("hospital/*.ckpt"))  # it never trained
    rows = [r for r in read_predictions(run) if r["site"] == "hospital"]
    assert len(rows) == HOSPITAL_IMAGES * len(CHOICES[experiment])


def _hospital_images(setting: dict) -> tuple[list[str], list[torch.Tensor]]:
    """The hospital's images as a centralised leave-one-site-out run reads them (its file names, its batches)."""
    cfg = compose_experiment("fedbn", [f"data.root={setting['root']}", *FAST])
    specs = json.loads((setting["runs"]["fedbn"] / "metrics.json").read_text())["run"]["sites"]  # the site files'
    datamodule = build(cfg.data, sites=["A"], test_sites=["hospital"], site_specs=specs, _convert_="all")
    datamodule.setup("test")
    files = [sample.name for sample in datamodule.splits["hospital"]["test"]]
    batches = [datamodule.on_after_batch_transfer(b, 0)["image"] for b in datamodule.unseen_loader("hospital", 0)]
    return files, batches


def _probabilities(experiment: str, state: dict[str, torch.Tensor], batches: list[torch.Tensor]) -> list[float]:
    """P(COVID) of the hospital's images by the experiment's one-site network holding `state`."""
    cfg = compose_experiment(experiment, FAST)
    network = build(cfg.model, sites=["A"], _convert_="all")
    network.load_state_dict({key: value.to(network.state_dict()[key].dtype) for key, value in state.items()})
    return site_probabilities(network.eval(), 0, batches)


def _check_each_choice_is_its_definition(setting: dict) -> None:
    files, batches = _hospital_images(setting)

    def site_state(run: Path, site: str) -> dict[str, torch.Tensor]:
        return read_checkpoint(run / "federated" / "clients" / site / "round-0002.ckpt")["state_dict"]

    def recorded(run: Path, choice: str) -> list[float]:
        rows = {r["file"]: r["prob_covid"] for r in read_predictions(run) if r["unseen_norm"] == choice}
        return [rows[file] for file in files]

    checked = 0
    for experiment, run in setting["runs"].items():
        shared = read_checkpoint(run / "federated" / "server.pt")["shared"]
        a, b = site_state(run, "A"), site_state(run, "B")
        kept_per_site = {  # FedBN: the norms; SiloBN: their statistics (its affine is the server's)
            "site:A": {**a, **shared},  # site A's final model: the server's weights and what A kept
            "site:B": {**b, **shared},
            "mean": {  # the server's weights and the mean of what the two sites kept
                **{key: (a[key].double() + b[key].double()) / 2 for key in a if a[key].is_floating_point()},
                **shared,
                **{key: a[key] for key in a if not a[key].is_floating_point()},
            },
        }
        expected = {
            "fedavg": {"shared": shared},  # the global model
            "local": {"site:A": a, "site:B": b},  # each site's own network, whole
            "fedbn": kept_per_site,
            "silobn": kept_per_site,
        }[experiment]
        for choice, state in expected.items():
            mine = _probabilities(experiment, state, batches)
            theirs = recorded(run, choice)
            assert max(abs(x - y) for x, y in zip(mine, theirs)) < 1e-5, (experiment, choice)
            checked += 1
        if experiment in ("fedbn", "silobn"):  # the site copies classify differently: the choices are not one model
            assert recorded(run, "site:A") != recorded(run, "site:B") != recorded(run, "adabn")
    assert checked == 9


def _check_silobn_keeps_the_batchnorm_statistics_at_each_site_and_shares_the_rest(setting: dict) -> None:
    run = setting["runs"]["silobn"]
    a, b = (read_checkpoint(run / "federated" / "clients" / s / "round-0002.ckpt")["state_dict"] for s in "AB")
    shared = read_checkpoint(run / "federated" / "server.pt")["shared"]
    network = build(compose_experiment("silobn", FAST).model, sites=["A"], _convert_="all")
    statistics = batchnorm_keys(network, statistics_only=True)
    affine = batchnorm_keys(network) - statistics
    assert statistics and affine and set(shared) == set(a) - statistics  # the affine left the sites, no statistic
    trained = [key for key in statistics if not key.endswith("num_batches_tracked")]
    assert all(not torch.equal(a[key], b[key]) for key in trained)  # each site's own statistics


def test_a_federation_that_leaves_one_site_to_train_is_refused_in_one_line(tmp_path: Path):
    result = run_cli(["experiment=fedavg", "data.test_sites=[B]", *FAST], tmp_path, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "at least two sites to train on" in line and "['A']" in line
