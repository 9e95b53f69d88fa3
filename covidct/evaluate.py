"""Evaluate a trained checkpoint on a labelled site, seen in training or not, as a run record.

`python -m covidct.evaluate ckpt=PATH site=NAME|FILE.yaml|FOLDER [out=DIR] [unseen_norm=all|adabn|mean|site:<name>]
['classes={covid: 1, normal: 0}'] [window=[-600,1500]] [data_root=DIR] [batch_size=32]
[device=auto|cpu|cuda] [patient_ids=pseudonym|raw] [pseudonym_key=PATH] [overwrite=false]`

The site is a site config (conf/data/site/<name>.yaml, or a YAML file), or a folder with one subfolder per
class. A site the checkpoint was trained on is classified with its own branch; any other with each of the
norms `unseen_choices` allows (or the one asked for), and for each the record holds metrics per image and
per patient (where the site has patient ids). Leave-one-site-out runs (`data.test_sites`, covidct.run) use
the same functions on their held-out sites. Writes metrics.json and predictions.csv in the run-record format,
and a ROC figure per norm choice; patients (and folders named by them) as keyed pseudonyms unless
`patient_ids=raw`, and never over a run's record or (without overwrite=true) an earlier evaluation.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from omegaconf import MISSING

from covidct.cli import cli_errors, parse_args, usage

USAGE = usage(__doc__)


@dataclass
class EvaluateArgs:
    ckpt: str = MISSING
    site: str = MISSING  # a site name (conf/data/site/), a site YAML file, or a folder of class folders
    out: str | None = None  # default: <run folder>/evaluate/<site>
    unseen_norm: str = "all"  # for a site the model never saw: all its choices, or one
    classes: dict[str, int] = field(default_factory=dict)  # a folder site's class folder -> label (COVID = 1)
    window: list[float] | None = None  # DICOM [centre, width] in HU (default: the site's, else the lung window)
    data_root: str | None = None  # where a site config's relative folder lies (default: the checkpoint's)
    batch_size: int = 32
    device: str = "auto"
    patient_ids: str = "pseudonym"  # or raw: the patient ids as the site gives them (they then leave the site)
    pseudonym_key: str | None = None  # the key file (default: $COVIDCT_PSEUDONYM_KEY, else ~/.config/covidct/)
    overwrite: bool = False  # replace an earlier evaluation in out (never a run's record)
    allow_outside_root: bool = False  # a site file's folder may lie outside data_root (as data.allow_outside_root)


@cli_errors
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(EvaluateArgs, argv, USAGE)
    from covidct.inference.evaluation import evaluate_checkpoint  # Lightning loads once the arguments parse

    path = evaluate_checkpoint(**asdict(args))
    print(f"wrote {path}, {path.parent / 'predictions.csv'} and the ROC figure in {path.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
