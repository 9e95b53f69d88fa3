"""`python -m covidct.data check`: one pass over a data root that says, before a long run, what training will meet.

Every image is decoded (corrupt files are found here, not hours into an epoch), byte-identical duplicates
are matched against the folds training would use, and every site's patient ids are checked against its files.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from covidct.data.dicom import DICOM_SUFFIX, is_dicom
from covidct.data.folds import FEW_IMAGES_PER_CLASS, N_FOLDS, assign_groups
from covidct.data.sites import PAPER_SITES, SiteSpec, read_patient_table, resolve_sites, unmapped_group
from covidct.data.sources import Sample, SiteListing, check_grouping, file_digest, list_site, load_image, scan_site
from covidct.errors import ConfigError, DataError

# The training part of a site is (N_FOLDS - 1) / N_FOLDS of it under the paper's protocol (no validation part).


@dataclass
class ClassStats:
    """What one class folder of one site holds; `bad` files are counted in `images` and `bytes` only."""

    site: str
    folder: str
    label: int
    images: int = 0
    formats: dict[str, int] = field(default_factory=dict)
    misnamed: int = 0
    modes: dict[str, int] = field(default_factory=dict)
    width: tuple[int, int] | None = None
    height: tuple[int, int] | None = None
    bytes: int = 0
    bad: int = 0


@dataclass
class Problem:
    """Something that would stop or break training; `file` is relative to the root when one file is to blame."""

    site: str | None
    message: str
    file: str | None = None


@dataclass
class DuplicateGroup:
    """Byte-identical files (relative paths) and the fold of each under the checked split (None: unknown)."""

    digest: str
    files: list[str]
    labels: list[int]
    folds: list[int | None]
    mixed_labels: bool
    mixed_sites: bool
    straddles: bool


@dataclass
class PatientCoverage:
    """A site's images against where its patient ids come from (`source`: its table, file-name pattern or patient
    folders), per class folder; `error` when a table is missing or malformed."""

    source: str = ""
    error: str | None = None
    mapped: dict[str, int] = field(default_factory=dict)
    unmapped: dict[str, int] = field(default_factory=dict)
    patients: dict[str, int] = field(default_factory=dict)
    unmapped_by_prefix: dict[str, int] = field(default_factory=dict)
    missing_files: list[str] = field(default_factory=list)
    patients_in_both_classes: list[str] = field(default_factory=list)


@dataclass
class DataReport:
    """Everything `check_data` found; `problems` would break training, `warnings` would only bias it."""

    root: str
    split_seed: int
    group_by: str
    batch_per_site: int
    classes: list[ClassStats] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    duplicates: list[DuplicateGroup] = field(default_factory=list)
    coverage: dict[str, PatientCoverage] = field(default_factory=dict)  # by site, for every site with patients

    @property
    def ok(self) -> bool:
        """False when training on this root would fail or read a broken file."""
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class _FileInfo:
    bytes: int
    digest: str | None = None
    format: str | None = None
    mode: str | None = None
    size: tuple[int, int] | None = None
    error: str | None = None


def _inspect(path: Path) -> _FileInfo:
    """Fully decode one file the way training does; runs in a worker process."""
    size_bytes = path.stat().st_size
    try:
        image = load_image(path)
        if is_dicom(path):  # PIL does not open it: what training reads is a windowed grey CT slice
            header = "DICOM", "CT", (image.shape[1], image.shape[0])
        else:
            with Image.open(path) as img:
                header = img.format, img.mode, img.size
        return _FileInfo(size_bytes, file_digest(path), *header)
    except (DataError, OSError) as err:
        return _FileInfo(size_bytes, error=str(err))


def _relative(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def _class_stats(site: str, folder: str, label: int, infos: list[tuple[Path, _FileInfo]]) -> ClassStats:
    stats = ClassStats(site, folder, label, images=len(infos), bytes=sum(info.bytes for _, info in infos))
    good = [(p, info) for p, info in infos if info.error is None]
    stats.bad = len(infos) - len(good)
    extensions = {**Image.registered_extensions(), DICOM_SUFFIX: "DICOM"}
    stats.formats = dict(sorted(Counter(info.format for _, info in good).items()))
    stats.modes = dict(sorted(Counter(info.mode for _, info in good).items()))
    stats.misnamed = sum(extensions.get(p.suffix.lower()) != info.format for p, info in good)
    if good:
        widths = [info.size[0] for _, info in good]
        heights = [info.size[1] for _, info in good]
        stats.width, stats.height = (min(widths), max(widths)), (min(heights), max(heights))
    return stats


def _patient_coverage(root: Path, spec: SiteSpec, images: list[tuple[Path, int]]) -> PatientCoverage:
    """How a site's patient table covers its images: what patient folds will group, and what they fall back on."""
    coverage = PatientCoverage(source=f"{spec.folder}/{spec.patients.file}")
    table = spec.site_dir(root) / spec.patients.file
    if not table.is_file():
        coverage.error = f"{table} is missing."
        return coverage
    try:
        patients = read_patient_table(spec, root)
    except DataError as err:
        coverage.error = str(err)
        return coverage
    names = {f"{p.parent.name}/{p.name}" for p, _ in images}
    classes = spec.classes
    coverage.mapped, coverage.unmapped = dict.fromkeys(classes, 0), dict.fromkeys(classes, 0)
    patients_of: dict[str, set[str]] = {folder: set() for folder in classes}
    for p, _ in images:
        folder, name = p.parent.name, f"{p.parent.name}/{p.name}"
        if name in patients:
            coverage.mapped[folder] += 1
            patients_of[folder].add(patients[name].split(":", 1)[-1])
        else:
            coverage.unmapped[folder] += 1
            group = unmapped_group(spec, name).split(":", 2)[2] if spec.patients.unmapped else p.stem
            prefix = f"{folder}/{group}"
            coverage.unmapped_by_prefix[prefix] = coverage.unmapped_by_prefix.get(prefix, 0) + 1
    coverage.missing_files = sorted(f"{spec.folder}/{name}" for name in patients if name not in names)
    _count_patients(coverage, patients_of)
    return coverage


def _count_patients(coverage: PatientCoverage, patients_of: dict[str, set[str]]) -> None:
    """Each class folder's patients, and the ids found in both classes (the two folders' sets)."""
    coverage.patients = {folder: len(ids) for folder, ids in patients_of.items()}
    covid_ids, non_covid_ids = patients_of.values()
    coverage.patients_in_both_classes = sorted(covid_ids & non_covid_ids)


def _id_coverage(spec: SiteSpec, samples: Sequence[Sample]) -> PatientCoverage:
    """How the ids a site's file names or folders give (patients.kind regex or folder) cover its images."""
    source = f"file names ({spec.patients.pattern})" if spec.patients.kind == "regex" else "patient folders"
    coverage = PatientCoverage(source=source)
    coverage.mapped, coverage.unmapped = dict.fromkeys(spec.classes, 0), dict.fromkeys(spec.classes, 0)
    patients_of: dict[str, set[str]] = {folder: set() for folder in spec.classes}
    for sample in samples:
        folder = sample.name.split("/", 1)[0]
        if sample.patient:
            coverage.mapped[folder] += 1
            # a folder id is '<class>:<patient folder>': the same folder under both classes is one patient twice
            patients_of[folder].add(
                sample.patient.split(":", 1)[-1] if spec.patients.kind == "folder" else sample.patient
            )
        else:
            coverage.unmapped[folder] += 1
            coverage.unmapped_by_prefix[folder] = coverage.unmapped_by_prefix.get(folder, 0) + 1
    _count_patients(coverage, patients_of)
    return coverage


def _duplicates(
    root: Path, digests: dict[Path, str], labels: dict[Path, int], folds: dict[Path, int]
) -> list[DuplicateGroup]:
    by_digest: dict[str, list[Path]] = defaultdict(list)
    for path, digest in digests.items():
        by_digest[digest].append(path)
    groups = []
    for digest, paths in sorted(by_digest.items(), key=lambda kv: sorted(kv[1])):
        if len(paths) < 2:
            continue
        paths = sorted(paths)
        group_folds = [folds.get(p) for p in paths]
        groups.append(
            DuplicateGroup(
                digest,
                [_relative(root, p) for p in paths],
                [labels[p] for p in paths],
                group_folds,
                mixed_labels=len({labels[p] for p in paths}) > 1,
                mixed_sites=len({p.relative_to(root).parts[0] for p in paths}) > 1,
                straddles=len({f for f in group_folds if f is not None}) > 1,
            )
        )
    return groups


def check_data(
    root: Path | str,
    split_seed: int = 0,
    group_by: str = "patient",
    batch_per_site: int = 16,
    workers: int | None = None,
    sites: Sequence[str] = PAPER_SITES,
    allow_outside_root: bool = False,
) -> DataReport:
    """Check everything training on `root` depends on; structural errors of one site do not stop the others' check.
    Site files' folders must lie under `root`, as in a run, unless `allow_outside_root` (data.allow_outside_root)."""
    check_grouping(group_by)
    if batch_per_site < 1:
        raise ConfigError(f"batch_per_site must be positive, got {batch_per_site}.")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise ConfigError(f"workers must be positive, got {workers}.")
    root = Path(root)
    specs = {spec.name: spec for spec in resolve_sites(sites, allow_outside_root=allow_outside_root)}
    notes = [spec.note(group_by) for spec in specs.values() if spec.patients.kind == "none"]
    report = DataReport(str(root), split_seed, group_by, batch_per_site, notes=notes)
    listings: dict[str, SiteListing] = {}
    listed: dict[str, list[tuple[Path, int]]] = {}
    for site, spec in specs.items():
        try:
            listing = list_site(root, spec)  # the walk a run makes: what it reads, and what it says it skips
        except DataError as err:
            report.problems.append(Problem(site, str(err)))
            continue
        listings[site], listed[site] = listing, listing.images
        report.warnings += listing.unread
    paths = [p for items in listed.values() for p, _ in items]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        infos = dict(zip(paths, pool.map(_inspect, paths, chunksize=max(1, len(paths) // (workers * 16)))))

    for site, items in listed.items():
        layout = specs[site]
        site_dir = layout.site_dir(root)
        for folder, label in layout.classes.items():
            in_class = [(p, infos[p]) for p, y in items if p.relative_to(site_dir).parts[0] == folder]
            report.classes.append(_class_stats(site, folder, label, in_class))
        for p, _ in items:
            if infos[p].error is not None:
                report.problems.append(Problem(site, infos[p].error, _relative(root, p)))
        training = len(items) * (N_FOLDS - 1) / N_FOLDS
        if training < batch_per_site:
            report.problems.append(
                Problem(
                    site,
                    f"site {site} has {len(items)} images, about {training:.0f} in a fold's training part: "
                    f"fewer than batch_per_site={batch_per_site}, so its batches cannot be filled; "
                    "lower data.batch_per_site.",
                )
            )

    for site in listed:
        if specs[site].patients.kind == "csv":
            report.coverage[site] = _patient_coverage(root, specs[site], listed[site])
            _judge_coverage(report, site, group_by)

    folds: dict[Path, int] = {}
    for site in listed:
        if group_by == "patient" and site in report.coverage and report.coverage[site].error is not None:
            continue
        try:
            samples = scan_site(root, specs[site], group_by, listings[site])
        except DataError as err:
            report.problems.append(Problem(site, str(err)))
            continue
        if specs[site].patients.kind in ("regex", "folder"):
            report.coverage[site] = _id_coverage(specs[site], samples)
            _judge_coverage(report, site, group_by)
        fold_of = assign_groups(samples, N_FOLDS, split_seed)
        folds.update((s.path, f) for s, f in zip(samples, fold_of))
        for fold in range(N_FOLDS):
            covid = sum(s.label for s, f in zip(samples, fold_of) if f == fold)
            other = sum(1 for f in fold_of if f == fold) - covid
            if min(covid, other) < FEW_IMAGES_PER_CLASS:
                report.warnings.append(
                    f"site {site}, fold {fold}: its test part holds {covid} COVID and {other} non-COVID images "
                    f"(split_seed={split_seed}); metrics of a class with no image are undefined (null)"
                )
    digests = {p: info.digest for p, info in infos.items() if info.digest is not None}
    labels = {p: y for items in listed.values() for p, y in items}
    report.duplicates = _duplicates(root, digests, labels, folds)
    for group in report.duplicates:
        files = " = ".join(group.files)
        if group.straddles:
            report.warnings.append(
                f"duplicates fall in different folds (train/test leakage with split_seed={split_seed}, "
                f"group_by={group_by}): {files}"
            )
        if group.mixed_labels:
            report.warnings.append(f"duplicates carry different labels: {files}")
        if group.mixed_sites:
            report.warnings.append(f"duplicates span both sites: {files}")
    return report


def _judge_coverage(report: DataReport, site: str, group_by: str) -> None:
    """A site's patient coverage as problems (an unusable table, for patient folds) and warnings."""
    cov = report.coverage[site]
    if cov.error is not None:
        message = f"{cov.error} Site {site} patient folds need it: restore the file or use data.group_by=image."
        if group_by == "patient":
            report.problems.append(Problem(site, message))
        else:
            report.warnings.append(f"{message} (not needed with group_by=image)")
        return
    if cov.missing_files:
        report.warnings.append(
            f"{cov.source} names {len(cov.missing_files)} file(s) that do not exist: {_examples(cov.missing_files)}"
        )
    if cov.patients_in_both_classes:
        report.warnings.append(
            f"{len(cov.patients_in_both_classes)} patient id(s) appear in both classes of site {site}, which folds "
            f"treat as different patients: {_examples(cov.patients_in_both_classes)}"
        )


def _examples(items: list[str], shown: int = 5) -> str:
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def _range(span: tuple[int, int] | None) -> str:
    return "-" if span is None else f"{span[0]}..{span[1]}"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{key} {n}" for key, n in counts.items()) or "-"


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(
            cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))
        ).rstrip()
        for row in rows
    ]


def format_report(report: DataReport) -> str:
    """The report as plain text: a table per site and class, then problems, duplicates, patient coverage, verdict."""
    lines = [
        f"Data check of {report.root} (split_seed={report.split_seed}, group_by={report.group_by}, "
        f"batch_per_site={report.batch_per_site})",
        "",
    ]
    if report.classes:
        rows = [
            ["site", "class", "images", "formats (content)", "misnamed", "modes", "width", "height", "bytes", "bad"]
        ]
        rows += [
            [
                c.site,
                c.folder,
                str(c.images),
                _counts(c.formats),
                str(c.misnamed),
                _counts(c.modes),
                _range(c.width),
                _range(c.height),
                f"{c.bytes:,}",
                str(c.bad),
            ]
            for c in report.classes
        ]
        lines += _table(rows, right={2, 4, 8, 9})
        lines.append("  (misnamed: the file name's suffix disagrees with the content, e.g. JPEG named .png)")
        lines.append("")

    lines.append(f"Problems ({len(report.problems)}):")
    lines += [
        f"  - {f'[{p.site}] ' if p.site else ''}{p.file + ': ' if p.file else ''}{p.message}" for p in report.problems
    ] or ["  none"]
    lines.append(f"Warnings ({len(report.warnings)}):")
    lines += [f"  - {w}" for w in report.warnings] or ["  none"]
    lines.append("Notes:")
    lines += [f"  - {n}" for n in report.notes]
    lines.append("")

    lines.append(f"Duplicates (byte-identical files): {len(report.duplicates)} group(s)")
    for g in report.duplicates:
        folds = ", ".join("?" if f is None else str(f) for f in g.folds)
        flags = [flag for flag, on in (("STRADDLES FOLDS", g.straddles), ("mixed labels", g.mixed_labels)) if on]
        flags += ["both sites"] if g.mixed_sites else []
        lines.append(f"  - {' = '.join(g.files)}  (folds {folds}{'; ' + ', '.join(flags) if flags else ''})")
    if report.duplicates:
        n_straddle = sum(g.straddles for g in report.duplicates)
        lines.append(
            f"  {n_straddle} group(s) straddle a fold boundary with split_seed={report.split_seed}, "
            f"group_by={report.group_by}"
        )
    lines.append("")

    for site, cov in sorted(report.coverage.items()):
        lines.append(f"Site {site} patient coverage ({cov.source}):")
        if cov.error is not None:
            lines.append(f"  unusable: {cov.error}")
            lines.append("")
            continue
        for folder in cov.mapped:
            total = cov.mapped[folder] + cov.unmapped[folder]
            lines.append(
                f"  {folder}: {cov.mapped[folder]} of {total} images mapped, {cov.unmapped[folder]} unmapped, "
                f"{cov.patients[folder]} patients"
            )
        lines.append(f"  unmapped images by group ({len(cov.unmapped_by_prefix)} group(s)):")
        lines += [f"    {prefix}: {n}" for prefix, n in sorted(cov.unmapped_by_prefix.items())] or ["    none"]
        lines.append(f"  rows naming files that do not exist: {len(cov.missing_files)}")
        lines.append(f"  patient ids in both classes: {len(cov.patients_in_both_classes)}")
        lines.append("")

    if report.ok:
        images = sum(c.images for c in report.classes)
        lines.append(
            f"OK: {images} images in {len({c.site for c in report.classes})} site(s) decoded; "
            f"{len(report.duplicates)} duplicate group(s), {len(report.warnings)} warning(s)"
        )
    else:
        lines.append(f"FAIL: {len(report.problems)} problem(s)")
    return "\n".join(lines)
