"""A trained checkpoint evaluated on a labelled site, seen in training or not, as a run record (`covidct.evaluate`).

A site the checkpoint was trained on is classified with its own branch; any other with each of the norms
`unseen_choices` allows (or the one asked for), and for each the record holds metrics per image and per patient
(where the site has patient ids). Leave-one-site-out runs (`data.test_sites`) score their held-out sites with the
same functions (covidct/scoring.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from covidct.data.folds import split_fold
from covidct.data.sites import SiteSpec, check_folder_inside, find_site, site_from_dict
from covidct.data.sources import Sample, patient_folders, scan_site
from covidct.errors import ConfigError
from covidct.inference.trained import TrainedModel, selection_of
from covidct.metrics import recomputed_test
from covidct.models.unseen import check_choice
from covidct.outputs import check_outputs
from covidct.pseudonyms import Pseudonyms
from covidct.records import EVALUATION, METRICS_FILE, PREDICTIONS_FILE, UNSEEN_COLUMN, git_commit, write_run_record
from covidct.report.curves import plot_rocs, roc_curve
from covidct.scoring import prediction_row, site_probabilities, unseen_site_rows


def folder_site(folder: Path, classes: Mapping[str, int], known: Iterable[SiteSpec]) -> SiteSpec:
    """A site from a folder of class folders: labels from `classes`, else from the class folders' names in the
    known sites (COVID, CT_COVID, ...)."""
    subfolders = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        labels = {name: label for spec in known for name, label in spec.classes.items()}
        classes = {name: labels[name] for name in subfolders if name in labels}
        if set(classes.values()) != {0, 1}:
            raise ConfigError(
                f"{folder} has the subfolders {subfolders}; say which is which with classes={{<covid folder>: 1, "
                "<other folder>: 0}}."
            )
    nested = any(
        any(p.is_dir() for p in (folder / name).iterdir()) and not any(p.is_file() for p in (folder / name).iterdir())
        for name in classes
        if (folder / name).is_dir()
    )  # class folders of patient (or series) folders, as DICOM exports are
    values = {"name": folder.name, "folder": str(folder.resolve()), "classes": dict(classes), "dataset": str(folder)}
    return site_from_dict({**values, "patients": {"kind": "folder" if nested else "none"}}, f"folder {folder}")


def evaluated_site(
    site: str, classes: Mapping[str, int], known: Iterable[SiteSpec], allow_outside_root: bool = False
) -> SiteSpec:
    """The site `site` names: a folder of class folders, one of the checkpoint's own sites (as it stored them;
    by name or alias), or a site config (conf/data/site/, or a YAML file), whose folder must lie under the data
    root unless `allow_outside_root`, as in a run."""
    known = list(known)
    path = Path(site).expanduser()
    if path.is_dir():
        spec = folder_site(path, classes, known)
        if spec.name in {s.name for s in known} | {a for s in known for a in s.aliases}:
            raise ConfigError(
                f"folder {path} is named like the checkpoint's site {spec.name}: an external dataset needs a name "
                "of its own (rename the folder, or describe it in a site YAML file)."
            )
        return spec
    if "/" in site and not site.endswith((".yaml", ".yml")):
        raise ConfigError(f"site={site}: no such folder (a site is a folder of class folders, a name or a YAML file).")
    stored = [spec for spec in known if site in (spec.name, *spec.aliases)]
    spec = stored[0] if stored else find_site(site)
    if not stored and not allow_outside_root:
        check_folder_inside(spec)
    if classes:
        return site_from_dict({**spec.as_dict(), "classes": dict(classes)}, spec.source)
    return spec


def _image_batches(model: Any, samples: Sequence[Sample], window: Sequence[float], size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(samples), size):
        resized = [model.load(s.path, window) for s in samples[start : start + size]]
        yield model.batch(resized)


def test_images(model: Any, spec: SiteSpec, root: Path) -> list[Sample]:
    """What is tested of a site: a site the model trained on, its fold's test part only (the rest trained
    it); any other site, every image (its grouping only names the patients)."""
    if spec.name not in model.method.sites:
        return scan_site(root, spec, "image")
    data = model.data
    samples = scan_site(root, spec, data["group_by"])
    return split_fold(samples, int(data["fold"]), int(data["split_seed"]), float(data["val_fraction"]))["test"]


def evaluate_checkpoint(
    ckpt: str,
    site: str,
    out: str | None = None,
    unseen_norm: str = "all",
    classes: Mapping[str, int] | None = None,
    window: Sequence[float] | None = None,
    data_root: str | None = None,
    batch_size: int = 32,
    device: str = "auto",
    patient_ids: str = "pseudonym",
    pseudonym_key: str | None = None,
    overwrite: bool = False,
    allow_outside_root: bool = False,
) -> Path:
    """Classify the site's test images and write the run record (metrics.json, predictions.csv, a ROC figure) in
    `out` (default: <run folder>/evaluate/<site>); returns its metrics.json. Patients (and folders named by them)
    appear as keyed pseudonyms unless `patient_ids=raw`; never written over a run's record or (without
    `overwrite`) an earlier evaluation."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}.")
    pseudonyms = Pseudonyms(patient_ids, pseudonym_key)
    model = TrainedModel(ckpt, device)
    spec = evaluated_site(site, classes or {}, model.specs.values(), allow_outside_root)
    root = Path(data_root).expanduser() if data_root else model.data_root
    trained = spec.name in model.method.sites
    if unseen_norm != "all" and trained:
        raise ConfigError(f"site {spec.name} is one the model was trained on: it needs no unseen_norm.")
    if unseen_norm != "all":
        check_choice(model.method, unseen_norm)
    out = Path(out) if out else Path(ckpt).resolve().parent.parent / "evaluate" / spec.name
    outputs = [out / METRICS_FILE, out / PREDICTIONS_FILE, out / f"roc_{spec.name}.png"]
    check_outputs(outputs, [Path(ckpt)], overwrite)
    samples = test_images(model, spec, root)
    if window is not None:
        spec = site_from_dict({**spec.as_dict(), "window": list(window)}, spec.source or "window=")

    def images() -> Iterator[torch.Tensor]:
        return _image_batches(model, samples, spec.window, batch_size)

    if trained:
        probs = site_probabilities(model.method, model.method.sites.index(spec.name), images())
        rows = [prediction_row(s, p) for s, p in zip(samples, probs)]
    else:
        choices = None if unseen_norm == "all" else [unseen_norm]
        rows = unseen_site_rows(model.method, spec.name, samples, images, choices)
    selection = selection_of(Path(ckpt))
    checkpoint = str(Path(ckpt).resolve())
    rows = [{"selection": selection, **r} for r in rows]
    result = recomputed_test({selection: {"checkpoint": checkpoint}}, rows, "mean")[selection]
    part = f"fold {model.data['fold']}'s test part" if trained else "every image"
    run = {
        "experiment": EVALUATION,
        "tested": f"{part} of site {spec.name}",
        "checkpoint": checkpoint,
        "trained_sites": list(model.method.sites),
        "method": type(model.method).__name__,
        "selections": [selection],
        "patient_pooling": "mean",
        "patient_ids": patient_ids,
        "pseudonym_key_id": pseudonyms.key_id,
        "git_commit": git_commit(),
        "device": str(model.device),
        "data_root": str(root.absolute()),
        "sites": {spec.name: spec.as_dict()},
        "splits": {"sites": {spec.name: {"test": {"images": len(samples), "covid": sum(s.label for s in samples)}}}}
        | ({} if trained else {"test_sites": [spec.name]}),
    }
    folders = {r["patient"]: patient_folders(spec, r["file"]) for r in rows}
    shown = pseudonyms.rows(rows, folders)
    path = write_run_record(out, {selection: result}, shown, run, {})
    curves = {}
    for how in dict.fromkeys(r.get(UNSEEN_COLUMN, "") for r in rows):
        mine = [r for r in rows if r.get(UNSEEN_COLUMN, "") == how]
        fpr, tpr, auc = roc_curve([r["label"] for r in mine], [r["prob_covid"] for r in mine])
        curves[f"{type(model.method).__name__}{f' ({how})' if how else ''}"] = (fpr, tpr, auc)
    title = f"Site {spec.name}: {spec.dataset}\nROC of {Path(ckpt).name}"
    caption = f"{len(samples)} images ({part}); trained on site(s) {', '.join(model.method.sites)}"
    plot_rocs(curves, title, out / f"roc_{spec.name}.png", caption)
    return path
