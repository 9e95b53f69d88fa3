"""Classify a folder of CT images with a trained checkpoint.

`python -m covidct.predict ckpt=PATH images=DIR site=A|B [out=predictions.csv] [batch_size=32]
[device=cpu|cuda|auto] [threshold=0.5]`

Images go through exactly the evaluation path of training (the checkpoint's image size, mean and std;
square resize, then normalisation) and the chosen site's branch (its norms, adapters or network).
"""

from __future__ import annotations

import csv
import io
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from covidct.data.sources import IMAGE_SUFFIXES, SITES, load_image, site_index
from covidct.data.transforms import deterministic_resize, normalize_images, to_chw_uint8
from covidct.errors import ConfigError, CovidCTError, DataError
from covidct.methods import SiteMethod, load_method
from covidct.records import atomic_write_text

CSV_COLUMNS = ("file", "prob_covid", "prediction", "error")
DEVICES = ("auto", "cpu", "cuda")
USAGE = (
    "python -m covidct.predict ckpt=PATH images=DIR site=A|B [out=predictions.csv] [batch_size=32] "
    "[device=cpu|cuda|auto] [threshold=0.5]"
)


@dataclass
class PredictArgs:
    ckpt: str = MISSING
    images: str = MISSING
    site: str = MISSING
    out: str = "predictions.csv"
    batch_size: int = 32
    device: str = "auto"
    threshold: float = 0.5


def parse_args(schema: type, argv: Sequence[str] | None, usage: str) -> Any:
    """key=value arguments over a dataclass of defaults; unknown, missing or mistyped keys become ConfigErrors."""
    argv = sys.argv[1:] if argv is None else list(argv)
    valid = ", ".join(f.name for f in fields(schema))
    loose = [arg for arg in argv if "=" not in arg]
    if loose:
        raise ConfigError(f"arguments are key=value, got {loose[0]!r}. Usage: {usage}")
    try:
        given = OmegaConf.from_cli(argv)
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot parse the arguments: {str(err).splitlines()[0]}") from None
    unknown = sorted(set(given) - {f.name for f in fields(schema)})
    if unknown:
        raise ConfigError(f"unknown argument(s) {', '.join(unknown)}; valid ones are {valid}.")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(schema), given)
    except OmegaConfBaseException as err:
        raise ConfigError(f"invalid value for {err.full_key}: {str(err).splitlines()[0]}") from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"missing required argument(s) {', '.join(missing)}. Usage: {usage}")
    return OmegaConf.to_object(cfg)


def resolve_device(name: str) -> torch.device:
    if name not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {name!r}.")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda, but no CUDA GPU is visible; use device=cpu or device=auto.")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


class TrainedModel:
    """A checkpoint's method together with the preprocessing and sites it was trained with.

    The preprocessing comes from the DataModule hyperparameters stored in the checkpoint, so a model is
    never fed images sized or normalised differently from its evaluation during training.
    """

    def __init__(self, ckpt: str | Path, device: str = "auto"):
        self.device = resolve_device(device)
        self.checkpoint = Path(ckpt)
        self.method: SiteMethod = load_method(self.checkpoint, map_location=str(self.device))
        data = torch.load(self.checkpoint, map_location="cpu", mmap=True, weights_only=False).get(
            "datamodule_hyper_parameters"
        )
        if not data:
            raise ConfigError(
                f"{self.checkpoint} holds no data settings (datamodule_hyper_parameters), so its image size and "
                "normalisation are unknown; it predates their recording. Retrain it with the current code."
            )
        self.image_size = int(data["image_size"])
        self.data_root = Path(str(data["root"])).expanduser()
        trained = [str(s) for s in data["sites"]]
        per_site_networks = getattr(self.method, "sites", None)
        self.sites = tuple(s for s in SITES if s in trained and (per_site_networks is None or s in per_site_networks))
        self._resize = deterministic_resize("eval", self.image_size)
        self.mean, self.std = tuple(data["mean"]), tuple(data["std"])

    def check_site(self, site: str) -> int:
        """The site's index, if the model has a trained branch for it; an untrained one would give noise."""
        index = site_index(site)
        if site not in self.sites:
            raise ConfigError(
                f"{self.checkpoint} was trained for site(s) {', '.join(self.sites)} only, not site {site}: "
                f"choose site={' or site='.join(self.sites)}."
            )
        return index

    def load(self, path: Path) -> np.ndarray:
        """Decoded and resized HxWx3 uint8: what the evaluation cache holds for this image."""
        return self._resize(load_image(path))

    def batch(self, resized: Sequence[np.ndarray]) -> torch.Tensor:
        """Normalised NCHW float tensor on the model's device."""
        images = torch.from_numpy(np.stack([to_chw_uint8(image) for image in resized])).to(self.device)
        return normalize_images(images, self.mean, self.std)  # as the DataModule does after transfer

    def prob_covid(self, images: torch.Tensor, site: str) -> np.ndarray:
        """P(COVID) from the site's branch, computed as in the test step of training."""
        site_tensor = torch.full((len(images),), self.check_site(site), dtype=torch.long, device=images.device)
        with torch.inference_mode():
            return self.method.logits(images, site_tensor).float().softmax(-1)[:, 1].cpu().numpy()


def image_files(folder: Path) -> list[Path]:
    """Image files directly in `folder` (by suffix), sorted; anything else is ignored."""
    if not folder.is_dir():
        raise ConfigError(f"image folder {folder} does not exist or is not a folder.")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{folder} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))}).")
    return files


def predict_folder(
    ckpt: str | Path,
    images: str | Path,
    site: str,
    batch_size: int = 32,
    device: str = "auto",
    threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """One row per image file: file, prob_covid, prediction and error (set, with no prob, if unreadable).

    An unreadable file does not stop the others: a folder of scans often holds a few damaged ones.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}.")
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"threshold must be in [0, 1], got {threshold}.")
    files = image_files(Path(images))
    model = TrainedModel(ckpt, device)
    model.check_site(site)
    rows: list[dict[str, Any]] = []
    for start in range(0, len(files), batch_size):
        readable: list[tuple[dict[str, Any], np.ndarray]] = []
        for path in files[start : start + batch_size]:
            row = {"file": path.name, "prob_covid": None, "prediction": None, "error": None}
            rows.append(row)
            try:
                readable.append((row, model.load(path)))
            except DataError as err:
                row["error"] = f"cannot read image: {err.__cause__ or err}"
        if readable:
            probs = model.prob_covid(model.batch([image for _, image in readable]), site)
            for (row, _), prob in zip(readable, probs.tolist()):
                row["prob_covid"] = prob
                row["prediction"] = "COVID" if prob >= threshold else "non-COVID"
    return rows


def write_predictions(rows: Sequence[dict[str, Any]], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if row[key] is None else row[key] for key in CSV_COLUMNS})
    atomic_write_text(path, buffer.getvalue())


def main(argv: Sequence[str] | None = None) -> int:
    """0: predictions written; 1: no image could be read; 2: bad arguments, checkpoint or folder."""
    try:
        args: PredictArgs = parse_args(PredictArgs, argv, USAGE)
        rows = predict_folder(args.ckpt, args.images, args.site, args.batch_size, args.device, args.threshold)
        out = Path(args.out)
        write_predictions(rows, out)
    except CovidCTError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    unreadable = [row for row in rows if row["error"]]
    for row in unreadable:
        print(f"unreadable: {row['file']}: {row['error']}", file=sys.stderr)
    classified = len(rows) - len(unreadable)
    print(f"{classified} image(s) classified, {len(unreadable)} unreadable; predictions written to {out}")
    if not classified:
        print(f"error: none of the {len(rows)} image files in {args.images} could be read.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
