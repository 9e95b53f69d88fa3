"""Grad-CAM overlays of test images per site, as in the paper's Figs. 4 and 5.

`python -m covidct.explain ckpt=PATH [site=A|B|NAME|all] [n=8] [files=[CLASS/FILE,...]] [data_root=DIR]
[predictions=PATH] [out=DIR] [device=cpu|cuda|auto] [seed=0] [overwrite=false] [pseudonym_key=PATH]`

By default the images are drawn from the run's predictions.csv (`<run>/predictions.csv`, the run folder
being two levels above the checkpoint): up to n per site, half of them misclassified when there are
that many, so the figure shows where the model fails as well as where it succeeds. Writes
`<out>/gradcam_<site>.png` and `<out>/gradcam_<site>.json` (the files shown, with label,
probability, correct/wrong and whether the map is flat, so uninformative); out defaults to `<run>/gradcam/`,
and grids already there are replaced only with overwrite=true.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from omegaconf import MISSING

from covidct.cli import cli_errors, parse_args, usage

USAGE = usage(__doc__)


@dataclass
class ExplainArgs:
    ckpt: str = MISSING
    site: str = "all"  # a site the checkpoint was trained for, or all of them ("both" too)
    n: int = 8
    files: list[str] | None = None
    data_root: str | None = None
    predictions: str | None = None
    out: str | None = None
    device: str = "auto"
    seed: int = 0
    overwrite: bool = False  # replace the grids of an earlier explain in out (never a run's record)
    pseudonym_key: str | None = None  # the key the run's pseudonyms were made with (default: the user's)


@cli_errors
def main(argv: Sequence[str] | None = None) -> int:
    """0: grids written; 2: bad arguments, checkpoint, predictions or images."""
    args = asdict(parse_args(ExplainArgs, argv, USAGE))
    from covidct.inference.gradcam import explain  # Lightning loads once the arguments parse

    site = args.pop("site")
    written = explain(sites=None if site in ("both", "all") else [site], **args)
    for png in written:
        tiles = json.loads(png.with_suffix(".json").read_text())["tiles"]
        wrong = sum(not tile["correct"] for tile in tiles)
        flat = sum(tile["flat_map"] for tile in tiles)
        print(f"{png}: {len(tiles)} image(s), {wrong} misclassified" + (f", {flat} flat map(s)" if flat else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
