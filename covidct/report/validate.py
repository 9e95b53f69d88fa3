"""What the report checks in a run folder before it counts the run: the record's sections hold what the tables
read, and the predictions are the whole test part the record says it tested.

Pure functions, like table1.py: each raises ValueError saying what is wrong (by the key's path in metrics.json),
and the CLI names the file. A record the tables cannot read would end in a traceback, and a truncated
predictions.csv would silently shrink every interval, DeLong test and figure built from it; both stop here.

Written by hand: the report reads a few keys of metrics.json, and saying which one is wrong needs no schema
library (none is a dependency; OmegaConf's structured configs take no `number or null` leaves).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from covidct.errors import DataError
from covidct.metrics import LEVELS
from covidct.records import EVALUATION, UNSEEN_COLUMN, held_out_sites

RUN_NAMES = ("git_commit", "device", "group_by")  # run fields the provenance joins as text, where present


def check_sections(record: Any) -> None:
    """A record has its 'run' and 'test' sections (objects): the least an evaluate record needs too."""
    if not (isinstance(record, dict) and isinstance(record.get("run"), dict) and isinstance(record.get("test"), dict)):
        raise ValueError("no 'run' and 'test' sections (half-written, or from an older covidct)")


def is_evaluation(record: Mapping[str, Any]) -> bool:
    """covidct.evaluate's record (a checkpoint on other data, e.g. under a run's folder), not a sweep's run."""
    return record["run"].get("experiment") == EVALUATION


def check_record(record: Mapping[str, Any]) -> None:
    """A run record (`check_sections` passed) holds everything the tables read: its identity, a test result per
    checkpoint selection with metrics of every site it tested, and the test counts of each site (run.splits)."""
    run, test = record["run"], record["test"]
    if not isinstance(run.get("experiment"), str) or not run["experiment"]:
        raise ValueError("run.experiment is missing or not a name")
    for key in ("fold", "seed"):
        if not _is_int(run.get(key)):
            raise ValueError(f"run.{key} is {run.get(key)!r}, not an integer")
    for key in RUN_NAMES:
        if key in run and not isinstance(run[key], str):
            raise ValueError(f"run.{key} is {run[key]!r}, not text")
    protocol = run.get("protocol")
    if protocol is not None and not (isinstance(protocol, dict) and isinstance(protocol.get("name"), str)):
        raise ValueError(f"run.protocol is {protocol!r}, not an object with a name")
    if not isinstance(record.get("config", {}), dict):
        raise ValueError("config is not an object")
    counts = test_counts(record)
    held = record["run"]["splits"].get("test_sites", [])
    if not isinstance(held, list) or not all(isinstance(site, str) for site in held):
        raise ValueError(f"run.splits.test_sites is {held!r}, not a list of sites")
    if not test:
        raise ValueError("test is empty: the run recorded no test result")
    for selection, result in test.items():
        where = f"test.{selection}"
        if not isinstance(result, dict):
            raise ValueError(f"{where} is not an object")
        _check_levels(result, where)
        seen = {"images": result["images"], **{f"unseen.{c}": r["images"] for c, r in result.get("unseen", {}).items()}}
        for site, (images, _) in counts.items():
            tested = [name for name, sites in seen.items() if site in sites]
            if images and not tested:
                raise ValueError(f"{where} has no metrics of site {site}, which run.splits says tested {images} images")
        if not any(seen.values()):
            raise ValueError(f"{where}.images is empty: the run tested no image")


def _check_levels(result: Mapping[str, Any], where: str) -> None:
    """`images` (and, where present, `patients` and each `unseen` choice's) map sites to metrics: numbers or null."""
    if not isinstance(result.get("images"), dict):
        raise ValueError(f"{where}.images is missing or not an object")
    unseen = result.get("unseen", {})
    if not isinstance(unseen, dict) or not all(isinstance(r, dict) for r in unseen.values()):
        raise ValueError(f"{where}.unseen is not an object of norm choices")
    levels = [(where, result), *((f"{where}.unseen.{c}", r) for c, r in unseen.items())]
    parts = [(f"{at}.{level}", part.get(level, {})) for at, part in levels for level in LEVELS]
    for path, sites in parts:
        if not isinstance(sites, dict):
            raise ValueError(f"{path} is not an object of sites")
        for site, metrics in sites.items():
            if not isinstance(metrics, dict):
                raise ValueError(f"{path}.{site} is not an object of metrics")
            for name, value in metrics.items():
                if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                    raise ValueError(f"{path}.{site}.{name} is {value!r}, not a number")


def test_counts(record: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """Each site's test images and COVID images among them, as the run recorded them (run.splits.sites)."""
    splits = record["run"].get("splits")
    sites = splits.get("sites") if isinstance(splits, dict) else None
    if not isinstance(sites, dict) or not sites:
        raise ValueError("run.splits.sites is missing: no test counts to check predictions.csv against (rerun it)")
    counts = {}
    for site, parts in sites.items():
        part = parts.get("test") if isinstance(parts, dict) else None
        if not isinstance(part, dict) or not _is_int(part.get("images")) or not _is_int(part.get("covid")):
            raise ValueError(f"run.splits.sites.{site}.test has no integer 'images' and 'covid' counts")
        counts[site] = (part["images"], part["covid"])
    return counts


def check_predictions(record: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> None:
    """The predictions (read_predictions' rows) are one per test image of every site and checkpoint selection
    the record tested (each norm choice, for a site held out), no more and no fewer, with the recorded COVID
    count: a file cut short or padded would change every number computed from it."""
    expected: dict[tuple[str, str, str], tuple[int, int]] = {}
    held = set(held_out_sites(record))
    for site, count in test_counts(record).items():
        for selection, result in record["test"].items():
            choices = list(result.get("unseen", {})) if site in held else [""]
            expected |= {(selection, site, choice): count for choice in choices if count[0]}
    groups: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["selection"], row["site"], row.get(UNSEEN_COLUMN) or ""), []).append(row)
    problems = []
    for key in sorted(set(expected) | set(groups)):
        selection, site, choice = key
        where = f"selection {selection}, site {site}" + (f" (unseen_norm {choice})" if choice else "")
        found = groups.get(key, [])
        if key not in expected:
            problems.append(f"{where}: {len(found)} rows, but the record has no such test part")
            continue
        images, covid = expected[key]
        files = Counter(row["file"] for row in found)
        twice = sorted(name for name, n in files.items() if n > 1)
        if len(found) != images:
            problems.append(f"{where}: {len(found)} predictions for the {images} test images run.splits records")
        elif twice:
            problems.append(f"{where}: {twice[0]} predicted {files[twice[0]]} times")
        elif sum(int(row["label"]) for row in found) != covid:
            found_covid = sum(int(row["label"]) for row in found)
            problems.append(f"{where}: {found_covid} COVID labels for the {covid} run.splits records")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(problems[0] + more)


def patient_naming(record: Mapping[str, Any]) -> str:
    """How a record's predictions name patients: 'raw' (also records from before pseudonyms), or 'pseudonyms of
    key <id>' (covidct/pseudonyms.py)."""
    run = record.get("run", {})
    if run.get("patient_ids", "raw") == "raw":
        return "raw ids"
    return f"pseudonyms of key {run.get('pseudonym_key_id')}"


def check_patient_naming(records: Sequence[Mapping[str, Any]]) -> None:
    """Refuse runs that name patients differently: their patient-level pooling is right, but the paired
    patient-level comparisons (DeLong, the t-tests' cells) would silently lose the patients they do not share."""
    namings: dict[str, str] = {}
    for record in records:
        namings.setdefault(patient_naming(record), str(record.get("_dir", "?")))
    if len(namings) > 1:
        shown = "; ".join(f"{naming} (e.g. {run})" for naming, run in namings.items())
        raise DataError(
            f"the runs name patients differently ({shown}): their patient-level comparisons would not pair. Rerun "
            "the odd ones with the same patient_ids and pseudonym key, or report them apart."
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
