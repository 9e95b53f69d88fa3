"""Federated runs (covidct/federated/) checked against their definitions, through the CLI and Flower's Simulation
Runtime, on phantoms: FedAvg's aggregate is the size-weighted mean of the sites' weights; FedBN keeps every
BatchNorm at its site and shares everything else; one FedBN round of one SGD step is SepNorm's centralised step;
FedProx with mu = 0 is FedAvg."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from covidct.checkpoints import read_checkpoint
from covidct.data.sampler import site_layout_of
from covidct.federated.client import SiteClient
from covidct.federated.sharing import as_dtype, batchnorm_keys
from covidct.training.fit import build
from tests.helpers import FAST, REPO, cli_env, compose_experiment, run_cli
from tests.phantoms import make_phantom_root

pytestmark = pytest.mark.slow  # each run starts Flower's runtime (Ray): tens of seconds
ONE_SGD_STEP = [  # one plain SGD step a round (the schedule's first epoch: its initial rate); no clipping
    "trainer.limit_train_batches=1",
    "trainer.gradient_clip_val=null",
    "model.optimizer._target_=torch.optim.SGD",
    "model.optimizer.lr=0.1",
    "model.optimizer.weight_decay=0",
]


@pytest.fixture(scope="session")  # session, not module: pytest-xdist's worksteal interleaves modules
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_phantom_root(tmp_path_factory.mktemp("federated") / "data", per_class=12)


def federated_run(experiment: str, root: Path, outputs: Path, *overrides: str) -> Path:
    """The run folder of `experiment` trained through the CLI."""
    args = [f"experiment={experiment}", f"data.root={root}", *FAST, "federated.rounds=1", *overrides]
    result = run_cli(args, outputs, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (record,) = (outputs / experiment).glob("*/metrics.json")
    return record.parent


def site_state(run: Path, site: str, server_round: int = 1) -> dict[str, torch.Tensor]:
    """A site's weights as it sent them at the end of a round (its checkpoint of that round)."""
    return read_checkpoint(run / "federated" / "clients" / site / f"round-{server_round:04d}.ckpt")["state_dict"]


def server_state(run: Path) -> dict:
    return read_checkpoint(run / "federated" / "server.pt")


@pytest.fixture(scope="session")
def unequal_root(root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Site A with 20 images a class, site B with 12: sites of different sizes."""
    bigger = make_phantom_root(tmp_path_factory.mktemp("unequal") / "data", per_class=20)
    shutil.rmtree(bigger / "covid-ct")
    shutil.copytree(root / "covid-ct", bigger / "covid-ct")
    return bigger


@pytest.fixture(scope="session")
def fedavg_run(unequal_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return federated_run("fedavg", unequal_root, tmp_path_factory.mktemp("fedavg"), "trainer.limit_train_batches=null")


def test_fedavg_aggregate_is_the_size_weighted_mean_of_the_sites_weights(fedavg_run: Path):
    record = json.loads((fedavg_run / "metrics.json").read_text())
    (sizes,) = record["run"]["federated"]["per_round"]
    n = {site: sizes[site]["num-examples"] for site in ("A", "B")}
    train = {site: record["run"]["splits"]["sites"][site]["train"]["images"] for site in ("A", "B")}
    assert n == train and n["A"] > n["B"]  # each site's size: its training images, which differ
    assert sizes["B"]["images_trained"] > sizes["B"]["num-examples"]  # site B's 4 passes do not weigh
    a, b = site_state(fedavg_run, "A"), site_state(fedavg_run, "B")
    shared = server_state(fedavg_run)["shared"]
    assert set(shared) == set(a)  # FedAvg shares everything
    moved = 0
    for key, value in shared.items():
        mean = (n["A"] * a[key].double() + n["B"] * b[key].double()) / (n["A"] + n["B"])
        torch.testing.assert_close(value.double(), mean, rtol=1e-6, atol=1e-6, msg=key)
        moved += not torch.equal(a[key], b[key])
    assert moved > 100  # the sites trained apart
    assert set(record["test"]["last"]["images"]) == {"A", "B"}
    for site in ("A", "B"):  # finished: each site's last round kept, weights only
        (kept,) = (fedavg_run / "federated" / "clients" / site).glob("*.ckpt")
        assert kept.name == "round-0001.ckpt" and "optimizer_states" not in read_checkpoint(kept)


@pytest.fixture(scope="session")
def fedbn_run(root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FedBN, 2 rounds: its definition, and the uninterrupted twin of a killed run."""
    return federated_run("fedbn", root, tmp_path_factory.mktemp("fedbn"), "federated.rounds=2")


def test_fedbn_keeps_every_batchnorm_at_its_site_and_shares_everything_else(fedbn_run: Path):
    run = fedbn_run
    a, b = site_state(run, "A", 2), site_state(run, "B", 2)
    network = build(compose_experiment("fedbn", FAST).model, sites=["A"], _convert_="all")
    norms = batchnorm_keys(network)
    layers = {
        f"{name}.{entry}"
        for name, module in network.named_modules()
        if isinstance(module, (nn.Conv2d, nn.Linear))
        for entry in module.state_dict()
    }
    shared = server_state(run)["shared"]
    assert set(shared) == set(a) - norms  # no BatchNorm entry left a site
    assert layers and layers <= set(shared)  # every convolution and dense layer did
    trained = [key for key in norms if not key.endswith("num_batches_tracked")]
    assert all(not torch.equal(a[key], b[key]) for key in trained)  # each site's own norms, statistics and affine
    # what each site tests with: the server's weights where shared, its own norms
    finals = {site: {**state, **shared} for site, state in (("A", a), ("B", b))}
    assert all(torch.equal(finals["A"][key], finals["B"][key]) for key in shared)
    record = json.loads((run / "metrics.json").read_text())
    sent = [site["bytes_received"] for round_ in record["run"]["federated"]["per_round"] for site in round_.values()]
    assert len(sent) == 4 and all(0 < size < sum(v.numel() * v.element_size() for v in a.values()) for size in sent)


def test_one_fedbn_round_of_one_sgd_step_is_sepnorm_s_centralised_step_with_twice_its_norms_step(
    root: Path, tmp_path: Path
):
    """The correspondence: SepNorm's loss is the mean over the 2 x b images of both sites, so a shared weight
    gets the mean of the two sites' gradients, which FedAvg of one step at each site (equal weights: b images
    each) gives exactly; a site's BatchNorm gets half its site's gradient there, the whole of it at its FedBN
    client. So FedBN = SepNorm with the norms' learning rate times the number of sites (here 2)."""
    run = federated_run("fedbn", root, tmp_path, *ONE_SGD_STEP)
    overrides = [f"data.root={root}", *FAST, *ONE_SGD_STEP]
    cfg = compose_experiment("sepnorm", overrides)
    batches = []
    for index, site in enumerate(("A", "B")):  # each site's first batch, as its client drew it
        datamodule = build(compose_experiment("fedbn", overrides).data, sites=[site], test_sites=[], _convert_="all")
        datamodule.setup("fit")
        batch = datamodule.on_after_batch_transfer(next(iter(datamodule.train_dataloader())), 0)
        batches.append({**batch, "site": torch.full_like(batch["site"], index)})
    batch = {key: torch.cat([b[key] for b in batches]) for key in ("image", "label", "site")}
    batch["site_layout"] = site_layout_of(batch["site"])
    pl.seed_everything(643)
    sepnorm = build(cfg.model, sites=["A", "B"], _convert_="all")
    before = {key: value.clone() for key, value in sepnorm.state_dict().items()}
    sepnorm.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each site's client runs (one CPU each): the same sums in the same order
    try:
        sepnorm.training_losses(batch)["loss"].backward()
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        for parameter in sepnorm.parameters():
            parameter -= 0.1 * parameter.grad
    after = sepnorm.state_dict()
    shared = server_state(run)["shared"]
    sites = {0: site_state(run, "A"), 1: site_state(run, "B")}
    parameters = dict(sepnorm.named_parameters())
    checked = 0
    for key, value in after.items():
        copy = next((i for i in (0, 1) if f".norms.{i}." in key), None)
        fed_key = key if copy is None else key.replace(f".norms.{copy}.", ".norms.0.")
        if copy is None:
            torch.testing.assert_close(shared[key], value, rtol=1e-6, atol=1e-6, msg=key)
        elif key in parameters:  # a site's affine: twice SepNorm's step
            step = sites[copy][fed_key] - before[key]
            torch.testing.assert_close(step, 2 * (value - before[key]), rtol=1e-6, atol=1e-6, msg=key)
        else:  # its running statistics: the same batch's, the same update
            torch.testing.assert_close(sites[copy][fed_key].to(value.dtype), value, rtol=1e-6, atol=1e-6, msg=key)
        checked += 1
    assert checked == len(after) and any(not torch.equal(after[k], before[k]) for k in shared)


def test_fedprox_with_mu_zero_is_fedavg(fedavg_run: Path, unequal_root: Path, tmp_path: Path):
    root = unequal_root  # fedavg_run's data
    same = federated_run(
        "fedprox", root, tmp_path / "zero", "trainer.limit_train_batches=null", "federated.proximal_mu=0"
    )
    assert (same / "predictions.csv").read_bytes() == (fedavg_run / "predictions.csv").read_bytes()
    shared, fedavg = server_state(same)["shared"], server_state(fedavg_run)["shared"]
    assert all(torch.equal(shared[key], fedavg[key]) for key in fedavg)


def test_a_fedprox_site_minimises_its_loss_plus_mu_half_the_squared_distance_to_the_server_s_weights(
    root: Path, tmp_path: Path
):
    """Site A's round through Flower with mu = 0.5, against the same round of a network whose loss has the
    proximal term written out (tests.helpers.ProximalJoint) trained by Lightning in this process."""
    mu, steps = 0.5, ["trainer.limit_train_batches=4"]
    run = federated_run("fedprox", root, tmp_path / "flower", *steps, f"federated.proximal_mu={mu}")
    overrides = [f"data.root={root}", *FAST, *steps, "federated.rounds=1"]
    by_definition = ["model._target_=tests.helpers.ProximalJoint", f"+model.proximal_mu={mu}"]
    cfg = compose_experiment("fedprox", [*overrides, *by_definition])
    client = SiteClient(cfg, "A", tmp_path / "definition", threads=1)  # one thread, as the simulated site
    plain = SiteClient(compose_experiment("fedprox", overrides), "A", tmp_path / "plain", threads=1)
    start = plain.model().state_dict()  # the server's first weights: every site's at the run's seed
    mine, _ = client.train_round(1, start, proximal_mu=0.0)  # the term in the loss, none added to the gradient
    theirs = site_state(run, "A")
    for key, value in mine.items():
        torch.testing.assert_close(theirs[key], value, rtol=1e-6, atol=1e-6, msg=key)
    without, _ = plain.train_round(1, start, proximal_mu=0.0)  # mu = 0: another round, so mu reached the site
    assert any(not torch.allclose(without[key], value, rtol=1e-4, atol=1e-4) for key, value in mine.items())


HALF = ["federated.rounds=4", "federated.fraction_fit=0.5", "seed=3", "keep_optimizer_state=true"]


@pytest.fixture(scope="session")
def half_run(unequal_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FedAvg with one of its two sites a round: its definition, and the uninterrupted twin of a killed run."""
    return federated_run("fedavg", unequal_root, tmp_path_factory.mktemp("half"), *HALF)


def test_with_half_the_sites_a_round_each_trains_in_its_drawn_rounds_on_the_federation_s_schedule(half_run: Path):
    """federated.fraction_fit=0.5 of two sites: one a round, drawn from the run's seed and the round (at seed 3:
    A, B, A, A). The round's aggregate is its one site's weights; a site that sat rounds out goes on from its last
    checkpoint, its own epochs counting only the rounds it trained, its learning-rate schedule at the federation's
    round (the cosine over all 4 rounds)."""
    from covidct.federated.rounds import sampled_sites

    run = half_run
    drawn = [sampled_sites(["A", "B"], 0.5, 3, r) for r in range(1, 5)]
    assert drawn == [["A"], ["B"], ["A"], ["A"]]  # A sits round 2 out, B starts late and sits out the rest
    record = json.loads((run / "metrics.json").read_text())
    assert [sorted(round_) for round_ in record["run"]["federated"]["per_round"]] == drawn
    assert record["run"]["federated"]["site_epochs"] == {"A": 3, "B": 1}
    assert set(record["test"]["last"]["images"]) == {"A", "B"}  # every site tests, whether in the last round or not
    for site, trained in (("A", [1, 3, 4]), ("B", [2])):
        (kept,) = (run / "federated" / "clients" / site).glob("*.ckpt")  # its last round's, the others deleted
        assert kept.name == f"round-{trained[-1]:04d}.ckpt"
        checkpoint = read_checkpoint(kept)
        assert checkpoint["epoch"] == len(trained)  # its own epochs: one a round it trained in
        (scheduler,) = checkpoint["lr_schedulers"]
        assert scheduler["last_epoch"] == trained[-1]  # the federation's: the rounds it sat out counted
        cosine = (1 + math.cos(math.pi * trained[-1] / 4)) / 2  # the schedule's factor at that round's end
        groups = checkpoint["optimizer_states"][0]["param_groups"]
        assert [group["lr"] for group in groups] == pytest.approx([group["initial_lr"] * cosine for group in groups])
    shared, a = server_state(run)["shared"], site_state(run, "A", 4)
    for key, value in shared.items():  # round 4's aggregate: site A's weights alone (B did not train in it)
        torch.testing.assert_close(value.double(), a[key].double(), rtol=1e-6, atol=1e-6, msg=key)


def test_a_site_that_no_round_would_draw_is_refused_in_one_line(tmp_path: Path):
    never = ["federated.fraction_fit=0.5", "federated.rounds=1", "seed=3"]  # A alone (half_run's first round)
    result = run_cli(["experiment=fedavg", *never, *FAST], tmp_path, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "draws site B in none of the 1 rounds" in line


@pytest.mark.parametrize("fraction", ["0", "1.5"])
def test_a_fraction_of_sites_outside_zero_to_one_is_refused_in_one_line(fraction: str, tmp_path: Path):
    result = run_cli(["experiment=fedavg", f"federated.fraction_fit={fraction}", *FAST], tmp_path, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert f"federated.fraction_fit={fraction}" in line and "(0, 1]" in line


@pytest.mark.parametrize(
    "experiment, twin, overrides, saved, lost",
    [
        ("fedbn", "fedbn_run", ["federated.rounds=2"], 1, False),  # killed in round 2 of 2
        # killed as the server saves round 3 (A's, from A's round 1), which it lost: A's checkpoint of it is ahead
        ("fedavg", "half_run", HALF, 2, True),
    ],
)
def test_a_federated_run_killed_mid_round_resumes_from_its_last_round_to_the_same_record(
    experiment: str,
    twin: str,
    overrides: list[str],
    saved: int,
    lost: bool,
    request: pytest.FixtureRequest,
    tmp_path: Path,
):
    straight = request.getfixturevalue(twin)
    data = request.getfixturevalue("unequal_root" if twin == "half_run" else "root")
    args = [f"experiment={experiment}", f"data.root={data}", *FAST, *overrides]
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "covidct.run", *args],
        cwd=REPO,
        env=cli_env(killed),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    folder = killed / experiment / straight.name
    state = folder / "federated" / "server.pt"

    def wait_for_round(server_round: int) -> None:
        deadline = time.time() + 300
        while not (state.is_file() and server_state(folder)["round"] >= server_round):
            assert process.poll() is None and time.time() < deadline, f"the run ended before round {server_round}"
            time.sleep(0.05)

    try:
        wait_for_round(saved)  # that round completed and saved
        # killed at once: the next round begins as this one is saved, and a round of 2 steps ends within a second
        if lost:  # ... or once the next is saved too, which the server then loses (its state of the round before)
            before = state.read_bytes()
            wait_for_round(saved + 1)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    if lost:
        state.write_bytes(before)
    assert not (folder / "metrics.json").exists(), "the kill came too late to test resuming"
    assert server_state(folder)["round"] == saved, "the kill came a round late: not mid-round"
    resumed = run_cli(args, killed, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming the federation from round" in resumed.stderr + resumed.stdout
    assert (folder / "predictions.csv").read_bytes() == (straight / "predictions.csv").read_bytes()
    mine, theirs = (json.loads((f / "metrics.json").read_text()) for f in (folder, straight))
    assert mine["test"] == theirs["test"]
    assert mine["run"]["federated"]["per_round"] == theirs["run"]["federated"]["per_round"]
    # the time of each completed round, the killed one's lost; the whole only where it ran in one piece
    for record, whole in ((mine, False), (theirs, True)):
        seconds, wall = record["run"]["federated"]["round_seconds"], record["run"]["federated"]["wall_s"]
        assert len(seconds) == len(record["run"]["federated"]["per_round"]) and all(s > 0 for s in seconds)
        assert (wall is not None and wall > sum(seconds)) if whole else wall is None


def test_a_site_that_fails_stops_the_run_in_one_line_naming_it(root: Path, tmp_path: Path):
    """Flower's own strategies would average the other sites and go on; a record without a site is wrong."""
    diverging = ["model._target_=tests.helpers.DivergingJoint", "+model.diverge_at_step=3", "federated.rounds=3"]
    result = run_cli(["experiment=fedavg", f"data.root={root}", *FAST, *diverging], tmp_path, timeout=600)
    assert result.returncode == 2
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert re.match(r"error: round 2 failed: site [AB]: ", line), line  # by its name, as the run's sites are
    assert "non-finite" in line and "Traceback" not in result.stderr
    assert not list(tmp_path.rglob("metrics.json"))
    (state,) = tmp_path.rglob("server.pt")
    assert server_state(state.parent.parent)["round"] == 1  # what a rerun resumes from


def _first_batch(datamodule, epoch: int) -> dict:
    """A site's first training batch of `epoch`, as its client draws it (the draws depend on seed and epoch)."""
    loader = datamodule.train_dataloader()
    loader.batch_sampler.sampler.set_epoch(epoch)
    return datamodule.on_after_batch_transfer(next(iter(loader)), 0)


def test_two_fedavg_rounds_of_one_sgd_step_each_match_the_definition_computed_by_hand(
    unequal_root: Path, tmp_path: Path
):
    """Round 2 starts at every site from round 1's size-weighted mean (weights and BatchNorm statistics alike),
    with the schedule's second learning rate; the result is the size-weighted mean again."""
    run = federated_run("fedavg", unequal_root, tmp_path, *ONE_SGD_STEP, "federated.rounds=2")
    overrides = [f"data.root={unequal_root}", *FAST, *ONE_SGD_STEP, "federated.rounds=2"]
    cfg = compose_experiment("fedavg", overrides)
    datamodules = {}
    for site in ("A", "B"):
        datamodules[site] = build(cfg.data, sites=[site], test_sites=[], _convert_="all")
        datamodules[site].setup("fit")
    n = {site: float(len(dm.splits[site]["train"])) for site, dm in datamodules.items()}
    pl.seed_everything(643)
    model = build(cfg.model, sites=["A"], _convert_="all")
    state = {key: value.clone() for key, value in model.state_dict().items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each site's client runs
    try:
        for epoch, lr in ((0, 0.1), (1, 0.1 * (1 + math.cos(math.pi / 2)) / 2)):  # cosine over the 2 rounds
            trained = {}
            for site, datamodule in datamodules.items():
                model.load_state_dict(state)
                model.train()
                model.zero_grad()
                model.training_losses(_first_batch(datamodule, epoch))["loss"].backward()
                with torch.no_grad():
                    for parameter in model.parameters():
                        parameter -= lr * parameter.grad
                trained[site] = {key: value.clone() for key, value in model.state_dict().items()}
            total = n["A"] + n["B"]
            state = {
                key: (n["A"] * trained["A"][key].double() + n["B"] * trained["B"][key].double()) / total
                for key in state
            }
            state = {key: as_dtype(value, trained["A"][key].dtype) for key, value in state.items()}
    finally:
        torch.set_num_threads(threads)
    shared = server_state(run)["shared"]
    assert set(shared) == set(state) and n["A"] != n["B"]
    for key, value in state.items():  # two rounds of float32 sums: 1e-5 (a site starting round 2 from its own
        # weights, or a constant learning rate, misses by 0.04 to 0.07)
        torch.testing.assert_close(shared[key].to(value.dtype), value, rtol=1e-5, atol=1e-5, msg=key)
