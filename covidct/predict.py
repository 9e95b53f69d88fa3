"""Classify a folder of CT images with a trained checkpoint.

`python -m covidct.predict ckpt=PATH images=DIR site=A|B|NAME [recursive=false] [out=predictions.csv]
[unseen_norm=adabn|mean|site:<name>] [window=[-600,1500]] [batch_size=32] [device=cpu|cuda|auto] [threshold=0.5]
[workers=N] [patient_ids=pseudonym|raw] [pseudonym_key=PATH] [overwrite=false]`

Images go through exactly the evaluation path of training (the checkpoint's image size, mean and std;
square resize, then normalisation) and the chosen site's branch (its norms, adapters or network).
DICOM CT slices (one folder per series) are read in Hounsfield units through the lung window, listed along
the body, and summarised per patient in a second file, `<out>_patients.csv`. A site the model never saw
needs `unseen_norm` where the model's norms are per site (models/unseen.py); `adabn` estimates that site's
BatchNorm statistics on the folder's own images. Patients are named by keyed pseudonyms (covidct/pseudonyms.py),
in the patient column and in the folders named by them, unless `patient_ids=raw`; every cell is safe to open in
a spreadsheet (covidct/csvfiles.py). `out` never replaces a run's record, an input, or (without overwrite=true)
an existing file.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from omegaconf import MISSING

from covidct.cli import cli_errors, parse_args, usage
from covidct.metrics import DECISION_THRESHOLD
from covidct.pseudonyms import key_file

DEFAULT_WORKERS = min(4, os.cpu_count() or 1)  # decoding is the bottleneck of a DICOM series on a CPU
USAGE = usage(__doc__)


@dataclass
class PredictArgs:
    ckpt: str = MISSING
    images: str = MISSING
    site: str = MISSING
    recursive: bool = False  # also the images in subfolders (e.g. one folder per class or patient)
    out: str = "predictions.csv"
    batch_size: int = 32
    device: str = "auto"
    threshold: float = DECISION_THRESHOLD
    unseen_norm: str | None = None  # for a site the model never saw: adabn, mean or site:<trained site>
    window: list[float] | None = None  # DICOM [centre, width] in HU (default: the site's, else the lung window)
    workers: int = DEFAULT_WORKERS  # processes decoding images while the model classifies (0: none)
    patient_ids: str = "pseudonym"  # or raw: PatientIDs as they are in the files (they then leave the site)
    pseudonym_key: str | None = None  # the key file (default: $COVIDCT_PSEUDONYM_KEY, else ~/.config/covidct/)
    overwrite: bool = False  # replace an existing out (never a run's record or an input)


@cli_errors
def main(argv: Sequence[str] | None = None) -> int:
    """0: predictions written; 1: no image could be read; 2: bad arguments, checkpoint or folder."""
    args = parse_args(PredictArgs, argv, USAGE)
    from covidct.inference.prediction import patients_file, predict_to_files  # Lightning loads once they parse

    rows, patients = predict_to_files(**asdict(args))
    if patients:
        ids = "raw patient ids" if args.patient_ids == "raw" else f"pseudonyms keyed by {key_file(args.pseudonym_key)}"
        print(f"{len(patients)} patient(s) of DICOM series summarised ({ids}) in {patients_file(Path(args.out))}")
    unreadable = [row for row in rows if row["error"]]
    for row in unreadable:
        print(f"unreadable: {row['file']}: {row['error']}", file=sys.stderr)
    classified = len(rows) - len(unreadable)
    print(f"{classified} image(s) classified, {len(unreadable)} unreadable; predictions written to {args.out}")
    if not classified:
        print(f"error: none of the {len(rows)} image files in {args.images} could be read.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
