"""Sites declared in config: one YAML file per site (conf/data/site/<name>.yaml), read by `SiteSpec`.

A site is a folder with one subfolder per class, plus how its images group into patients, which is what
folds keep on one side of a split:
- `none`: no patient ids, so results are image-level (`duplicates: together` keeps byte-identical files in
  one group, as site A needs);
- `csv`: a table of file -> patient id (`unmapped` says what an image missing from it becomes);
- `regex`: the patient id is the first group of a pattern matched against the file name;
- `folder`: one folder per patient (or DICOM series) inside each class folder.
Adding a hospital is one such file; the two paper datasets are two of them (sars_cov_2.yaml = site A,
covid_ct.yaml = site B), found by file name or by their short name.
"""

from __future__ import annotations

import csv
import functools
import io
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePath
from typing import Any

import yaml  # omegaconf's own parser: its errors are what a bad site file raises
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from covidct.data.dicom import LUNG_WINDOW
from covidct.errors import ConfigError, DataError
from covidct.schemas import checked, rule

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
SITE_CONFIG_GROUP = Path("data") / "site"
PATIENT_KINDS = ("none", "csv", "regex", "folder")
COVID_LABELS = (0, 1)
PAPER_SITES = ("A", "B")  # the paper's datasets (Table I), as the records have always named them


@dataclass(frozen=True)
class Patients:
    """How a site's images group into patients (`kind`, one of PATIENT_KINDS) and that kind's settings."""

    kind: str = rule(f"be one of {', '.join(PATIENT_KINDS)}", lambda kind: kind in PATIENT_KINDS, "none")
    # none: 'together' puts byte-identical files in one group
    duplicates: str = rule("be 'apart' or 'together'", lambda how: how in ("apart", "together"), "apart")
    file: str = ""  # csv: the table, a path inside the site folder (relative, no '..')
    columns: dict[str, str] = field(default_factory=dict)  # csv: {file, patient[, folder]} -> column names
    unmapped: dict[str, str] = field(default_factory=dict)  # csv: {} (an error) or {regex, tag}
    pattern: str = ""  # regex: its first group is the patient id


@dataclass(frozen=True)
class SiteSpec:
    """One site: its name in records, the folder holding its class folders (relative to data.root; a site file's
    folder outside it only with data.allow_outside_root), which class folder means which label (COVID = 1), its
    patients, where to get it, the dataset it is (figures name it) and the Hounsfield window its DICOM slices are
    shown through. Its fields are also the schema of a site file (site_from_dict)."""

    name: str = rule("be letters, digits, '_', '.' or '-'", lambda name: re.fullmatch(r"[A-Za-z0-9_.-]+", name))
    folder: str = rule("be the folder holding the class folders (under data.root)")
    classes: dict[str, int] = rule(
        "give label 1 (COVID) and 0 (non-COVID), each to a folder, e.g. {covid: 1, normal: 0}",
        lambda classes: set(classes.values()) == set(COVID_LABELS),
    )
    patients: Patients = field(default_factory=Patients)
    download: str = ""
    dataset: str = ""
    aliases: tuple[str, ...] = ()
    window: tuple[float, float] = rule(
        "be [centre, width] in Hounsfield units, width > 0", lambda w: len(w) == 2 and w[1] > 0, LUNG_WINDOW
    )
    fold_note: str = ""  # what a record says of this site's folds; derived from `patients` where empty
    source: str = ""  # the YAML file it was read from

    def site_dir(self, root: Path) -> Path:
        """The folder of the class folders: `folder` under the data root, or `folder` itself if absolute (where
        resolve_sites allowed it)."""
        return Path(root) / self.folder

    def as_dict(self) -> dict[str, Any]:
        """Plain data, as checkpoints and records store it (site_from_dict reads it back); without the file it
        came from, a path of one machine."""
        values = asdict(self)
        del values["source"]
        values["aliases"] = list(self.aliases)
        values["window"] = list(self.window)
        return values

    def note(self, group_by: str) -> str:
        """What a record says of this site's folds under data.group_by."""
        if self.fold_note and group_by == "patient":
            return self.fold_note
        kind = self.patients.kind
        if group_by == "image":
            return f"site {self.name} folds are image-level (data.group_by=image)"
        if kind == "none":
            together = " (byte-identical duplicates kept together)" if self.patients.duplicates == "together" else ""
            return (
                f"site {self.name} has no patient ids: its folds are image-level{together}, so slices of one "
                "patient can fall on both sides of a split"
            )
        where = {"csv": self.patients.file, "regex": f"file names, {self.patients.pattern}", "folder": "folders"}
        return f"site {self.name} folds are patient-disjoint (patients from {where[kind]})"


def _problem(source: str, message: str) -> ConfigError:
    return ConfigError(f"site config {source}: {message}")


def stays_inside(path: str) -> bool:
    """Whether a path a site names stays inside the folder it is relative to: not absolute, and no '..' climbing
    above it (judged on the text, as written: symlinks the user placed under the data root are the user's own)."""
    return not PurePath(path).is_absolute() and PurePath(os.path.normpath(path)).parts[:1] != ("..",)


def _set(values: Any) -> Any:
    """Mappings (nested too) without null or '' values (the default), keys as text (a folder named 1 is '1')."""
    if not isinstance(values, Mapping):
        return values
    return {str(k): _set(v) for k, v in values.items() if v is not None and v != ""}


def _patients(values: Any, source: str) -> Patients:
    """A site's `patients` (a mapping, or its kind alone) by the schema, then what each kind needs."""
    given = _set({"kind": values} if isinstance(values, str) else values)
    patients = Patients(**checked(Patients, given, f"site config {source}", "patients"))
    if patients.kind == "csv":
        if not patients.file:
            raise _problem(source, "patients.kind csv needs patients.file, the table of file -> patient id.")
        if not stays_inside(patients.file):
            raise _problem(
                source,
                f"patients.file {patients.file!r} must be a path inside the site folder (relative, without '..'): "
                "a site's table lies with its images; copy it there.",
            )
        if set(patients.columns) - {"file", "patient", "folder"}:
            raise _problem(source, "patients.columns may map file, patient and folder to the table's column names.")
        if patients.unmapped and set(patients.unmapped) != {"regex", "tag"}:
            raise _problem(source, "patients.unmapped must be {regex: PATTERN, tag: WORD} (or absent: an error).")
    for pattern in filter(None, (patients.pattern, patients.unmapped.get("regex"))):
        try:
            re.compile(pattern)
        except re.error as err:
            raise _problem(source, f"pattern {pattern!r} is not a regular expression ({err}).") from None
    if patients.kind == "regex" and not patients.pattern:
        raise _problem(source, "patients.kind regex needs patients.pattern, whose first group is the patient id.")
    return patients


def site_from_dict(values: Mapping[str, Any], source: str = "", default_name: str = "") -> SiteSpec:
    """A SiteSpec from a site file's (or a checkpoint's) mapping, by SiteSpec's schema (a null or '' value means
    the default; `aliases` may be one name), or a ConfigError naming the bad key."""
    source = source or "(inline)"
    if not isinstance(values, Mapping):
        raise _problem(source, f"a site config is a mapping, got {type(values).__name__}.")
    given = {"name": default_name, "source": source, **_set(values)}  # a stored spec keeps the file it came from
    patients = _patients(given.pop("patients", {}), source)
    if isinstance(given.get("aliases"), str):
        given["aliases"] = [given["aliases"]]
    site = checked(SiteSpec, given, f"site config {source}")
    dataset, aliases, window = site["dataset"] or site["name"], tuple(site["aliases"]), tuple(site["window"])
    return SiteSpec(**site | {"patients": patients, "dataset": dataset, "aliases": aliases, "window": window})


def read_site_file(path: Path) -> SiteSpec:
    """The site a YAML file declares (its name defaults to the file's stem); read once while it is unchanged
    (a run looks its sites up from the config check, the resolvers, the DataModule and the figures)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"site config {path} does not exist.")
    return _parsed_site_file(path, path.stat().st_mtime_ns)


# `${` not escaped as `\${`: an OmegaConf interpolation (OmegaConf.is_interpolation also flags escaped text)
INTERPOLATION = re.compile(r"(?<!\\)\$\{")


def _interpolated_keys(node: Any, prefix: str = "") -> Iterator[str]:
    """The dotted keys of a YAML's unresolved values that hold an interpolation."""
    if isinstance(node, Mapping | list):
        items = node.items() if isinstance(node, Mapping) else enumerate(node)
        for key, value in items:
            yield from _interpolated_keys(value, f"{prefix}{key}.")
    elif isinstance(node, str) and INTERPOLATION.search(node):
        yield prefix.rstrip(".")


@functools.lru_cache(maxsize=256)
def _parsed_site_file(path: Path, mtime_ns: int) -> SiteSpec:
    """A site file's values, as written. Interpolations are refused, not resolved: a site file travels between
    institutions as plain data, and `${oc.env:...}` (or any resolver) would copy this machine's environment
    into the site's spec, which checkpoints, metrics.json and the logger's hyperparameters store."""
    try:
        loaded = OmegaConf.load(path)
        interpolated = list(_interpolated_keys(OmegaConf.to_container(loaded, resolve=False)))
        values = None if interpolated else OmegaConf.to_container(loaded, resolve=True)  # resolves escapes only
    except OSError as err:
        raise ConfigError(f"cannot read site config {path} ({err.strerror or err}).") from None
    except (OmegaConfBaseException, yaml.YAMLError, ValueError) as err:
        raise ConfigError(f"site config {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if interpolated:
        raise _problem(
            str(path),
            f"{interpolated[0]} is an interpolation (${{...}}); a site file holds plain values, never read from "
            "this machine's environment or config: write the value itself.",
        )
    return site_from_dict(values or {}, str(path), default_name=path.stem)


def search_dirs() -> list[Path]:
    """The config folders sites are looked up in: Hydra's search path during a run (so `--config-dir` and
    `hydra.searchpath` add sites), first, so that a user's file wins over a name in this project's conf/,
    which comes last."""
    dirs: list[Path] = []
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            for source in HydraConfig.get().runtime.config_sources:
                if source.schema == "file":
                    dirs.append(Path(source.path))
    except ImportError:  # pragma: no cover - hydra is a dependency
        pass
    return [*dict.fromkeys([*(d for d in dirs if d.resolve() != CONF_DIR), CONF_DIR])]


def _site_files(dirs: Iterable[Path]) -> list[Path]:
    return [path for d in dirs for path in sorted((Path(d) / SITE_CONFIG_GROUP).glob("*.yaml"))]


def find_site(name: str, dirs: Sequence[Path] | None = None) -> SiteSpec:
    """The site `name` names: a YAML file's path, conf/data/site/<name>.yaml, or a site whose name or alias it
    is (A and B, the paper's)."""
    dirs = list(dirs) if dirs is not None else search_dirs()
    name = str(name)
    if name.endswith((".yaml", ".yml")):
        return read_site_file(Path(name).expanduser())
    for d in dirs:
        path = Path(d) / SITE_CONFIG_GROUP / f"{name}.yaml"
        if path.is_file():
            return read_site_file(path)
    known, broken = [], []
    for path in _site_files(dirs):
        try:
            known.append(read_site_file(path))
        except ConfigError as err:  # one broken file must not hide the others' names
            broken.append(str(err))
    known.sort(key=lambda s: (s.name not in PAPER_SITES, s.name))
    for spec in known:
        if name == spec.name or name in spec.aliases:
            return spec
    listed = ", ".join(f"{s.name} ({Path(s.source).stem})" if Path(s.source).stem != s.name else s.name for s in known)
    where = ", ".join(str(Path(d) / SITE_CONFIG_GROUP) for d in dirs)
    raise ConfigError(
        f"unknown site {name!r}: no {name}.yaml in {where} and no site named so. Known sites: {listed}. "
        "Add your own as one YAML file there (README, 'Your own hospital')."
        + (f" Unreadable: {'; '.join(broken)}" if broken else "")
    )


def check_folder_inside(spec: SiteSpec) -> SiteSpec:
    if not stays_inside(spec.folder):
        raise _problem(
            spec.source,
            f"folder {spec.folder!r} lies outside data.root (absolute, or '..'): move or link the site under "
            "data.root, or allow folders elsewhere with data.allow_outside_root=true (data check: "
            "--allow-outside-root).",
        )
    return spec


def resolve_sites(
    names: Sequence[str],
    given: Mapping[str, Mapping[str, Any]] | None = None,
    dirs: Sequence[Path] | None = None,
    allow_outside_root: bool = False,
    key: str = "data.sites",
) -> list[SiteSpec]:
    """The specs of `names` in order; `given` (a checkpoint's or a run's stored specs) wins over files.
    Refuses a site named twice in `key`, under its name or an alias, and a site file whose folder lies outside the data
    root unless `allow_outside_root` (data.allow_outside_root). Specs `given` are not held to the root: they are
    the user's own config (data.site_specs) or a checkpoint's record of the folders of the machine that trained
    it."""
    specs = []
    for name in names:
        stored = (given or {}).get(str(name))
        if stored is not None:
            specs.append(site_from_dict(stored, f"data.site_specs.{name}", str(name)))
        else:
            found = find_site(name, dirs)
            specs.append(found if allow_outside_root else check_folder_inside(found))
    seen: dict[str, str] = {}
    for name, spec in zip(names, specs):
        if spec.name in seen:
            raise ConfigError(f"{key} names site {spec.name} twice ({seen[spec.name]!r} and {name!r}).")
        seen[spec.name] = str(name)
    return specs


def split_sites(
    names: Sequence[str],
    held_out: Sequence[str] = (),
    given: Mapping[str, Mapping[str, Any]] | None = None,
    dirs: Sequence[Path] | None = None,
    allow_outside_root: bool = False,
) -> tuple[list[SiteSpec], list[SiteSpec]]:
    """data.sites and data.test_sites as (the sites trained on, the sites only tested), each resolved once: a
    held-out site named by an alias is the same site, and one outside data.sites is tested too. No site named
    but some held out is a site that only tests (a federation's unseen hospital, covidct/federated/unseen.py)."""
    listed = resolve_sites(names, given, dirs, allow_outside_root)
    held = resolve_sites(held_out, given, dirs, allow_outside_root, key="data.test_sites")
    unseen = {spec.name for spec in held}
    trained = [spec for spec in listed if spec.name not in unseen]
    if not trained and (listed or not held):
        raise ConfigError(
            f"data.test_sites={list(held_out)} leaves no site of data.sites={list(names)} to train on: name one more."
        )
    return trained, held


def paper_site(name: str) -> SiteSpec:
    """Site A or B from this project's own conf/ (download, `data check` and the figures' defaults)."""
    return find_site(name, [CONF_DIR])


def dataset_name(site: str, records: Iterable[Mapping[str, Any]] = ()) -> str:
    """The dataset a site is, for figures: from the run records' stored sites, else this project's site files,
    else the site's name."""
    for record in records:
        stored = record.get("run", {}).get("sites", {}).get(site)
        if stored:
            return str(stored.get("dataset") or site)
    try:
        return find_site(site, [CONF_DIR]).dataset
    except ConfigError:
        return site


# Patients ---------------------------------------------------------------------------------------------------
def read_patient_table(spec: SiteSpec, root: Path) -> dict[str, str]:
    """A csv site's table as '<class folder>/<file>' -> patient id ('<folder>:<id>' when the table has a
    folder column: an id then names a patient within its class folder, as in COVID-CT). Public so `data check`
    measures the mapping the folds use."""
    path = spec.site_dir(root) / spec.patients.file
    if not path.is_file():
        raise DataError(
            f"{path} is missing: site {spec.name}'s patient-grouped folds need it. Restore it from the dataset, "
            "or use image-level folds with data.group_by=image."
        )
    columns = {"file": "file", "patient": "patient_id", **spec.patients.columns}
    reader = csv.DictReader(io.StringIO(_utf8_text(path), newline=""))
    needed = {columns[k] for k in ("file", "patient", "folder") if k in columns}
    if reader.fieldnames is None or not needed <= set(reader.fieldnames):
        raise DataError(f"{path} must have the columns {sorted(needed)}; found {reader.fieldnames}.")
    repeated = sorted(name for name, count in Counter(reader.fieldnames).items() if count > 1)
    if repeated:  # csv.DictReader would keep the last column of each name, silently
        raise DataError(f"{path} names the column(s) {repeated} more than once in its header; keep one of each.")
    mapping: dict[str, str] = {}
    first_line: dict[str, int] = {}
    keys = ("folder", "file", "patient") if "folder" in columns else ("file", "patient")
    for line_no, row in enumerate(reader, start=2):
        values = {k: (row[columns[k]] or "").strip() for k in keys}
        if not all(values.values()):
            raise DataError(f"{path} line {line_no}: empty {', '.join(columns[k] for k in keys)}.")
        key = f"{values['folder']}/{values['file']}" if "folder" in values else values["file"]
        if key in first_line:
            raise DataError(
                f"{path} line {line_no} repeats {key} (first at line {first_line[key]}); keep one row per image."
            )
        first_line[key] = line_no
        mapping[key] = f"{values['folder']}:{values['patient']}" if "folder" in values else values["patient"]
    return mapping


def _utf8_text(path: Path) -> str:
    """A table's text, UTF-8 (with or without a byte-order mark). Another encoding is refused, not guessed:
    Latin-1 decodes any bytes, so a wrong guess would silently rename patients and files."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read {path} ({err.strerror or err}); fix its permissions.") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(
            f"{path} line {line} is not UTF-8 (byte {data[err.start]:#04x}): save the table as UTF-8, e.g. "
            f"`iconv -f latin1 -t utf-8` for a Latin-1 export."
        ) from None


def unmapped_group(spec: SiteSpec, name: str) -> str:
    """The group of a csv site's image missing from its table: '<class>:<tag>:<first regex group>' (site B:
    the source paper's prefix stands in for a patient). Public so `data check` reports the very groups the
    folds fall back on."""
    folder, _, file = name.rpartition("/")
    match = re.match(spec.patients.unmapped["regex"], file)
    prefix = match.group(1) if match and match.groups() else Path(file).stem
    return f"{folder}:{spec.patients.unmapped['tag']}:{prefix}"


def regex_patient(spec: SiteSpec, path: Path, required: bool = True) -> str:
    """The patient id in a file's name by the site's pattern ('' for a name it does not match, unless the
    patient is `required`: patient-level folds)."""
    match = re.search(spec.patients.pattern, path.name)
    if not match and not required:
        return ""
    if not match:
        raise DataError(
            f"{path}: its name does not match site {spec.name}'s patients.pattern {spec.patients.pattern!r}; "
            "rename it, fix the pattern, or use data.group_by=image."
        )
    return match.group(1) if match.groups() else match.group(0)


PAPER_REPEAT = {"B": 4}  # site B's 4 passes per epoch: the authors' setting (auto would give 3 on fold 0)


def checked_repeat(repeat: Mapping[str, int] | str | None, specs: Sequence[SiteSpec]) -> dict[str, int] | str:
    """data.repeat as a {site name: passes} dict (aliases such as covid_ct allowed; the paper's sites may be
    named while not in the run: single-site mode) or 'auto', or a ConfigError naming what is wrong
    (check_config calls it too, before any work)."""
    if repeat is None:
        return dict(PAPER_REPEAT)
    if isinstance(repeat, str):
        if repeat != "auto":
            raise ConfigError(f"data.repeat must be 'auto' or a mapping such as {{B: 4}}, got {repeat!r}.")
        return repeat
    names = {alias: spec.name for spec in specs for alias in (spec.name, *spec.aliases)}
    names |= {site: site for site in PAPER_SITES}
    factors = {}
    for site, factor in dict(repeat).items():
        if site not in names:
            raise ConfigError(f"data.repeat names site {site!r}; the sites are {', '.join(s.name for s in specs)}.")
        if not isinstance(factor, int) or isinstance(factor, bool) or factor < 1:
            raise ConfigError(f"data.repeat: site {site}'s factor must be an integer >= 1, got {factor!r}.")
        factors[names[site]] = factor
    return factors
