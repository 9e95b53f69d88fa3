"""Synthetic CT-like phantoms in both publishers' layouts, for tests that need tiny, fast inputs.

COVID phantoms carry bright ground-glass blobs in the lungs, so a model can learn something.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from covidct.data.sites import PAPER_SITES, paper_site


def phantom(label: int, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = h / 2, w / 2
    img = np.full((h, w), 10.0)
    body = ((yy - cy) / (0.45 * h)) ** 2 + ((xx - cx) / (0.45 * w)) ** 2 < 1
    img[body] = 120
    for side in (-1, 1):
        lung = ((yy - cy) / (0.3 * h)) ** 2 + ((xx - cx - side * 0.2 * w) / (0.14 * w)) ** 2 < 1
        img[lung] = 30
        if label == 1:
            for _ in range(3):
                by = cy + rng.uniform(-0.2, 0.2) * h
                bx = cx + side * 0.2 * w + rng.uniform(-0.08, 0.08) * w
                blob = ((yy - by) ** 2 + (xx - bx) ** 2) < (0.05 * min(h, w)) ** 2
                img[blob & lung] = 170
    img += rng.normal(0, 8, size=(h, w))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_phantom_root(root: Path, per_class: int = 24, seed: int = 0) -> Path:
    """Both sites, both classes, `per_class` images each, in the real layouts, with the real quirks:
    grayscale, RGB and RGBA PNGs, JPEG files and a JPEG named .png on site B, and a patients.csv."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    patients = []
    for site, layout in ((name, paper_site(name)) for name in PAPER_SITES):
        for class_folder, label in layout.classes.items():
            folder = root / layout.folder / class_folder
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                size = (int(rng.integers(60, 90)), int(rng.integers(70, 110)))
                gray = phantom(label, size, rng)
                variant = i % 4
                if site == "A" or variant == 0:
                    name = f"img{i:03d}.png"
                    Image.fromarray(gray).save(folder / name)
                elif variant == 1:
                    name = f"img{i:03d}.png"  # JPEG content behind a .png name, as 34 real site-B files
                    Image.fromarray(gray).convert("RGB").save(folder / name, format="JPEG")
                elif variant == 2:
                    name = f"img{i:03d}.png"
                    rgba = np.dstack([gray, gray, gray, np.full_like(gray, 255)])
                    Image.fromarray(rgba, "RGBA").save(folder / name)
                else:
                    name = f"img{i:03d}.jpg"
                    Image.fromarray(gray).convert("RGB").save(folder / name, format="JPEG")
                if site == "B":
                    patients.append((class_folder, name, f"Patient {i // 3}"))
    meta = root / "covid-ct" / "Meta"
    meta.mkdir(parents=True, exist_ok=True)
    with (meta / "patients.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["folder", "file", "patient_id"])
        writer.writerows(patients)
    return root


def make_hospital_site(root: Path, name: str = "hospital", patients: int = 4, slices: int = 5, seed: int = 1) -> Path:
    """A third site as a user's own hospital would be laid out: <name>/{covid,normal}/<patient>/<slice>.png, the
    folder kind of patients (conf/data/site/my_hospital.yaml), `patients` per class, `slices` each."""
    rng = np.random.default_rng(seed)
    for class_folder, label in (("covid", 1), ("normal", 0)):
        for p in range(patients):
            folder = Path(root) / name / class_folder / f"P{label}{p:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(slices):
                size = (int(rng.integers(60, 90)), int(rng.integers(70, 110)))
                Image.fromarray(phantom(label, size, rng)).save(folder / f"slice{k:02d}.png")
    return Path(root) / name


def hospital_site_config(config_dir: Path, name: str = "hospital", folder: str | None = None) -> Path:
    """The one YAML file that adds make_hospital_site's site: <config_dir>/data/site/<name>.yaml."""
    path = Path(config_dir) / "data" / "site" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"name: {name}\n"
        f"dataset: phantom hospital {name}\n"
        f"folder: {folder or name}\n"
        "classes: {covid: 1, normal: 0}\n"
        "patients: {kind: folder}\n"
    )
    return path
