"""Grad-CAM overlays of a checkpoint's test images per site, as in the paper's Figs. 4 and 5 (`covidct.explain`).

The images are drawn from the run's predictions (up to n per site, half of them misclassified when there are
that many, so the figure shows where the model fails as well as where it succeeds) or named; each grid's JSON
beside it lists the files shown, with label, probability, correct/wrong and whether the map is flat.
"""

from __future__ import annotations

import json
import math
import random
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from covidct.atomic import atomic_write_text
from covidct.data.sites import SiteSpec
from covidct.data.sources import COVID, patient_folders, scan_site
from covidct.errors import ConfigError, DataError
from covidct.inference.trained import TrainedModel, selection_of
from covidct.methods import SiteMethod
from covidct.metrics import predicts_covid
from covidct.models.routing import SiteBlocks
from covidct.outputs import check_outputs
from covidct.pseudonyms import Pseudonyms
from covidct.records import PREDICTIONS_FILE, read_predictions, read_run_record
from covidct.report.curves import save_figure

GRID_COLUMNS = 4
TILE_TITLE_WIDTH = 38  # characters of a 7-pt title line that fit over a tile
TITLE_CHARS_PER_INCH = 11  # of the 10-pt figure title
FLAT_RANGE = 1e-3  # maps are scaled to [0, 1] per image: a smaller spread is a constant map
FLAT_NOTE = "flat map: uninformative"


class SiteBound(nn.Module):
    """A method with its site fixed: Grad-CAM calls model(x), and the CAM must come from that site's branch."""

    def __init__(self, method: SiteMethod, site: str):
        super().__init__()
        self.method = method
        self.sites = SiteBlocks.single(method.sites.index(site))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.logits(x, self.sites)


def grad_cam(method: SiteMethod, site: str, images: torch.Tensor) -> np.ndarray:
    """COVID-class Grad-CAM at `method.cam_layer(site)`: one HxW map in [0, 1] per image, at the input size."""
    with GradCAM(model=SiteBound(method, site), target_layers=[method.cam_layer(site)]) as cam:
        return cam(input_tensor=images, targets=[ClassifierOutputTarget(COVID)] * len(images))


def site_of(file: str, specs: Mapping[str, SiteSpec], explained: Sequence[str] = ()) -> str:
    """The site among `specs` whose class folder starts `file` (the paper's two publishers' differ); where
    several share that folder name, the one of them being `explained` (else: choose with site=NAME)."""
    folder, _, name = file.partition("/")
    found = [site for site, spec in specs.items() if folder in spec.classes and name]
    chosen = [site for site in found if site in explained]
    if len(found) == 1 or len(chosen) == 1:
        return (chosen or found)[0]
    if found:
        raise ConfigError(f"files: {file!r} could be an image of site {' or '.join(found)}; choose one with site=NAME.")
    known = "; ".join(f"site {site}: {', '.join(spec.classes)}" for site, spec in specs.items())
    raise ConfigError(f"files: {file!r} must be <class folder>/<file name>, the class folder one of ({known}).")


def true_label(file: str, spec: SiteSpec) -> int:
    return spec.classes[file.partition("/")[0]]


def is_correct(prob_covid: float, label: int) -> bool:
    """Judged by the evaluation's decision rule, so the figure agrees with the run's accuracy."""
    return predicts_covid(prob_covid) == (label == COVID)


def choose(rows: Sequence[dict[str, Any]], n: int, seed: int) -> list[str]:
    """Up to n files, half misclassified (all of them if fewer), the rest correct; reproducible for a seed."""
    correct = sorted(r["file"] for r in rows if is_correct(r["prob_covid"], r["label"]))
    wrong = sorted(r["file"] for r in rows if not is_correct(r["prob_covid"], r["label"]))
    n_wrong = min(len(wrong), max((n + 1) // 2, n - len(correct)))
    n_correct = min(len(correct), n - n_wrong)
    rng = random.Random(seed)
    return sorted(rng.sample(correct, n_correct)) + sorted(rng.sample(wrong, n_wrong))


def _selection(
    sites: Sequence[str],
    specs: Mapping[str, SiteSpec],
    files: Sequence[str] | None,
    predictions: Path,
    selection: str,
    n: int,
    seed: int,
) -> dict[str, list[str]]:
    if files is not None:
        chosen: dict[str, list[str]] = {site: [] for site in sites}
        for file in files:
            site = site_of(file, specs, sites)
            if site not in chosen:
                raise ConfigError(
                    f"files: {file} is a site {site} image, but only site(s) {', '.join(sites)} are explained."
                )
            chosen[site].append(file)
        chosen = {site: picked for site, picked in chosen.items() if picked}
        if not chosen:
            raise ConfigError("files=[] names no image.")
        return chosen
    if not predictions.is_file():
        raise ConfigError(
            f"no predictions file {predictions}: pass predictions=PATH (a run's predictions.csv) or files=[...]."
        )
    rows = [r for r in read_predictions(predictions) if r["selection"] == selection]
    chosen = {}
    for site in sites:
        site_rows = [r for r in rows if r["site"] == site]
        if not site_rows:
            raise DataError(f"{predictions} has no predictions for site {site}; choose images with files=[...].")
        chosen[site] = choose(site_rows, n, seed)
    return chosen


def _patient_ids(run_dir: Path) -> str:
    """How the run's record names patients (records from before pseudonyms: raw)."""
    try:
        return str(read_run_record(run_dir)["run"].get("patient_ids", "raw"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "raw"


def names_on_disk(spec: SiteSpec, root: Path, pseudonyms: Pseudonyms) -> dict[str, str]:
    """{an image's name as the records show it: its name under the site folder} where they differ: a folder-kind
    site's patient folders appear as pseudonyms (covidct/pseudonyms.py), found again by the key's holder only."""
    if pseudonyms.raw or spec.patients.kind != "folder":
        return {}
    samples = scan_site(root, spec, "image")
    aliases = {s.patient: patient_folders(spec, s.name) for s in samples}
    shown = pseudonyms.rows([{"patient": s.patient, "file": s.name} for s in samples], aliases)
    return {row["file"]: s.name for row, s in zip(shown, samples)}


def is_flat(cam: np.ndarray) -> bool:
    """A map (near) constant over the image carries no information (no gradient reached the layer, or every
    activation was off), yet its uniform colour would read as 'equally relevant everywhere'."""
    return float(cam.max() - cam.min()) < FLAT_RANGE


def describe_run(run_dir: Path) -> str:
    """The run a checkpoint belongs to, from the record beside it; a run without one (still training, or a
    checkpoint copied elsewhere) is named by its folder."""
    try:
        run = read_run_record(run_dir)["run"]
        return f"run {run['experiment']}, fold {run['fold']}, seed {run['seed']}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"run folder {run_dir.name} (no run record: fold unknown)"


def tile_title(tile: dict[str, Any]) -> str:
    """File name wrapped to the tile's width (a very long one shortened in the middle, where names differ
    least), then the truth, the probability and the verdict."""
    name = tile["file"]
    if len(name) > 2 * TILE_TITLE_WIDTH:
        name = f"{name[: TILE_TITLE_WIDTH - 1]}…{name[-TILE_TITLE_WIDTH:]}"
    truth = "COVID" if tile["label"] == COVID else "non-COVID"
    verdict = "correct" if tile["correct"] else "wrong"
    return "\n".join(
        [*textwrap.wrap(name, TILE_TITLE_WIDTH), f"true {truth}, p(COVID)={tile['prob_covid']:.3f}, {verdict}"]
    )


def gradcam_figure(
    title: str, tiles: Sequence[dict[str, Any]], images: Sequence[np.ndarray], cams: Sequence[np.ndarray]
) -> Figure:
    """A grid of Grad-CAM overlays (HxWx3 uint8 images, HxW maps in [0, 1]) with a colourbar for the maps;
    a flat map's tile says it is uninformative."""
    cols = min(GRID_COLUMNS, len(tiles))
    rows = math.ceil(len(tiles) / cols)
    width = 3 * cols + 1.2
    fig = Figure(figsize=(width, 3.4 * rows + 0.8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    # wrapped to the figure's width, which a grid of one tile makes narrow
    lines = [textwrap.fill(line, int(TITLE_CHARS_PER_INCH * width)) for line in title.split("\n")]
    fig.suptitle("\n".join(lines), fontsize=10)
    grid = []
    for i, (tile, image, cam) in enumerate(zip(tiles, images, cams)):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(show_cam_on_image(image.astype(np.float32) / 255, cam, use_rgb=True))
        ax.set_axis_off()
        ax.set_title(tile_title(tile), fontsize=7, color="tab:green" if tile["correct"] else "tab:red")
        if is_flat(cam):
            ax.text(
                0.5,
                0.5,
                FLAT_NOTE,
                transform=ax.transAxes,
                ha="center",
                va="center",
                fontsize=8,
                bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "black"},
            )
        grid.append(ax)
    # the overlays use OpenCV's JET colour map, which matplotlib's "jet" matches
    colours = ScalarMappable(Normalize(0.0, 1.0), cmap="jet")
    bar = fig.colorbar(colours, ax=grid, shrink=0.9, pad=0.02)
    bar.set_label("Grad-CAM relevance for COVID\n(scaled per image: 0 least, 1 most)", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    return fig


def explain(
    ckpt: str | Path,
    sites: Sequence[str] | None = None,
    n: int = 8,
    files: Sequence[str] | None = None,
    data_root: str | Path | None = None,
    predictions: str | Path | None = None,
    out: str | Path | None = None,
    device: str = "auto",
    seed: int = 0,
    overwrite: bool = False,
    pseudonym_key: str | None = None,
) -> list[Path]:
    """Write a Grad-CAM grid per site (sites=None: every site the checkpoint was trained for); returns the PNGs.

    The tiles show this checkpoint's own probabilities; labels come from the class folders.
    """
    if n < 1:
        raise ConfigError(f"n must be at least 1, got {n}.")
    model = TrainedModel(ckpt, device)
    sites = list(model.sites if sites is None else (model.site_name(site) for site in sites))
    for site in sites:
        if site not in model.sites:  # the tiles come from the run's own test predictions of its sites
            raise ConfigError(
                f"{ckpt} was trained for site(s) {', '.join(model.sites)} only, not site {site}: choose "
                f"site={' or site='.join(model.sites)}."
            )
    run_dir = Path(ckpt).resolve().parent.parent
    root = Path(data_root).expanduser() if data_root is not None else model.data_root
    out_dir = Path(out) if out is not None else run_dir / "gradcam"
    predictions = Path(predictions) if predictions else run_dir / PREDICTIONS_FILE
    chosen = _selection(sites, model.specs, files, predictions, selection_of(Path(ckpt)), n, seed)
    outputs = [out_dir / f"gradcam_{site}{suffix}" for site in sites for suffix in (".png", ".json")]
    check_outputs(outputs, [Path(ckpt), predictions], overwrite)
    run = f"{describe_run(run_dir)} ({type(model.method).__name__})"
    written = []
    pseudonyms = Pseudonyms(_patient_ids(run_dir), pseudonym_key)
    for site, picked in chosen.items():
        spec = model.specs[site]
        on_disk = names_on_disk(spec, root, pseudonyms)
        shown = {name: file for file, name in on_disk.items()}
        paths = [spec.site_dir(root) / on_disk.get(file, file) for file in picked]
        picked = [shown.get(on_disk.get(file, file), file) for file in picked]  # tiles name files as records do
        for path in paths:
            if not path.is_file():
                raise DataError(f"{path} does not exist; set data_root=DIR to the data root holding it.")
        resized = [model.load(path, spec.window) for path in paths]
        images = model.batch(resized)
        probs = model.prob_covid(images, site).tolist()
        cams = grad_cam(model.method, site, images)
        labels = [true_label(file, spec) for file in picked]
        tiles = [
            {
                "file": file,
                "label": label,
                "prob_covid": prob,
                "correct": is_correct(prob, label),
                "flat_map": is_flat(cam),
            }
            for file, label, prob, cam in zip(picked, labels, probs, cams)
        ]
        png = out_dir / f"gradcam_{site}.png"
        title = (
            f"Grad-CAM of class COVID, site {site}: {spec.dataset}\n{run}\n"
            f"checkpoint {Path(ckpt).name} (selection {selection_of(Path(ckpt))})"
        )
        save_figure(gradcam_figure(title, tiles, resized, cams), png)
        record = {"site": site, "checkpoint": str(ckpt), "target_class": "COVID", "tiles": tiles}
        atomic_write_text(png.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
        written.append(png)
    return written
