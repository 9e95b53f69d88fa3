"""Site files and patient tables from another institution, and the data settings that used to end wrong: through
`python -m covidct.data check` and `python -m covidct.run`, on phantom data."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from covidct.data.__main__ import main as data_main
from tests.helpers import FAST, cli_env, run_cli
from tests.phantoms import make_hospital_site

SECRET = "s3cret-token-4711"  # an environment value that must never reach output or records
CHECK = ["--batch-per-site", "4", "--workers", "1"]


@pytest.fixture
def phantom_copy(phantom_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(phantom_root, root)
    return root


def _site_file(config_dir: Path, name: str, **values: object) -> Path:
    path = config_dir / "data" / "site" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"classes": {"covid": 1, "normal": 0}, "patients": {"kind": "folder"}, **values}))
    return path


def _one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def test_a_site_file_reaches_no_file_outside_the_data_root_unless_allowed(phantom_copy: Path, tmp_path: Path, capsys):
    """patients.file: /etc/passwd used to print that file's first line; a folder outside the root needs the option."""
    passwd = _site_file(tmp_path / "conf", "passwd", folder="covid-ct", patients={"kind": "csv", "file": "/etc/passwd"})
    climbing = _site_file(
        tmp_path / "conf", "climbing", folder="covid-ct", patients={"kind": "csv", "file": "../../etc/passwd"}
    )
    for site in (passwd, climbing):
        assert data_main(["check", "--root", str(phantom_copy), "--sites", str(site), *CHECK]) == 2
        captured = capsys.readouterr()
        assert "must be a path inside the site folder" in _one_error_line(captured.err)
        assert "root:" not in captured.out + captured.err

    make_hospital_site(tmp_path / "elsewhere")  # a hospital's folder beside the data root, not in it
    outside = _site_file(tmp_path / "conf", "hospital", folder=str(tmp_path / "elsewhere" / "hospital"))
    assert data_main(["check", "--root", str(phantom_copy), "--sites", str(outside), *CHECK]) == 2
    assert "lies outside data.root" in _one_error_line(capsys.readouterr().err)
    argv = ["check", "--root", str(phantom_copy), "--sites", str(outside), "--allow-outside-root", *CHECK]
    assert data_main(argv) == 0
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("OK: 40 images in 1 site(s)")


def test_a_site_file_without_classes_is_one_line_naming_the_key(phantom_root: Path, tmp_path: Path, capsys):
    site = tmp_path / "conf" / "data" / "site" / "unlabelled.yaml"
    site.parent.mkdir(parents=True)
    site.write_text("folder: covid-ct\npatients: folder\n")
    assert data_main(["check", "--root", str(phantom_root), "--sites", str(site), *CHECK]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: site config {site}: classes is missing: it must give label 1 (COVID) and 0")


def test_a_site_file_may_not_read_the_environment(phantom_copy: Path, tmp_path: Path):
    site = _site_file(tmp_path / "conf", "leaky", folder="covid-ct", dataset="${oc.env:COVIDCT_TEST_SECRET}")
    result = run_cli(
        ["check", "--root", str(phantom_copy), "--sites", str(site), *CHECK],
        tmp_path,
        env={**cli_env(tmp_path), "COVIDCT_TEST_SECRET": SECRET},
        module="covidct.data",
    )
    assert result.returncode == 2
    assert "dataset is an interpolation" in _one_error_line(result.stderr)
    assert SECRET not in result.stdout + result.stderr


def _rewrite_table(root: Path, header: list[str], row: callable, encoding: str = "utf-8") -> None:
    table = root / "covid-ct" / "Meta" / "patients.csv"
    rows = list(csv.reader(table.open(newline="")))[1:]
    with table.open("w", newline="", encoding=encoding) as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(row(r) for r in rows)


def test_a_patient_table_with_a_repeated_column_or_not_in_utf8_is_refused_by_name(phantom_copy: Path, capsys):
    """A second patient_id column made every image of a class one patient while data check said OK; a Latin-1
    table gave a UnicodeDecodeError traceback."""
    _rewrite_table(phantom_copy, ["folder", "file", "patient_id", "patient_id"], lambda r: [*r, "same"])
    assert data_main(["check", "--root", str(phantom_copy), *CHECK]) == 1
    out = capsys.readouterr().out
    assert "patients.csv names the column(s) ['patient_id'] more than once in its header" in out
    assert out.rstrip().endswith("FAIL: 1 problem(s)")

    _rewrite_table(phantom_copy, ["folder", "file", "patient_id"], lambda r: [r[0], r[1], "Müller"], "latin-1")
    assert data_main(["check", "--root", str(phantom_copy), *CHECK]) == 1
    out = capsys.readouterr().out
    assert "patients.csv line 2 is not UTF-8 (byte 0xfc): save the table as UTF-8" in out


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.test_sites=[A,B]", r"data.test_sites=['A', 'B'] leaves no site of data.sites=['A', 'B'] to train on"),
        ("data.test_sites=[C]", "unknown site 'C'"),
        ("data.test_sites=[B,covid_ct]", "data.test_sites names site B twice ('B' and 'covid_ct')"),
        ("data.val_fraction=0.99", "data.val_fraction must be a finite number >= 0 and <= 0.5, got 0.99"),
        ("+data.note=${oc.env:COVIDCT_TEST_SECRET}", "data.note reads the environment"),
        ("data.sites=[A,B,hospital]", "lies outside data.root (absolute, or '..')"),
        ("data.allow_outside_root=maybe", "data.allow_outside_root must be true or false, got 'maybe'"),
        # Hydra's own report of a key it cannot compose: five lines and a hint at HYDRA_FULL_ERROR
        ("model.tua=0.1", "cannot compose the config: Could not override 'model.tua' (Key 'tua' is not in struct)"),
        ("fold=[1", "cannot parse 'fold=[1': no viable alternative at input '[1'"),
        pytest.param(
            "trainer.precision=16-mixed",
            "trainer.precision=16-mixed is fp16 autocast, which needs a GPU",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 autocast runs on a GPU"),
        ),
    ],
)
def test_data_settings_that_ended_in_a_traceback_or_wrong_numbers_are_one_line(
    phantom_root: Path, tmp_path: Path, override: str, message: str
):
    conf = tmp_path / "conf"
    _site_file(conf, "hospital", folder=str(tmp_path / "elsewhere" / "hospital"))
    result = run_cli(
        ["experiment=ours", f"data.root={phantom_root}", f"hydra.searchpath=[file://{conf}]", *FAST, override],
        tmp_path,
        env={**cli_env(tmp_path), "COVIDCT_TEST_SECRET": SECRET},
    )
    assert result.returncode == 2
    assert message in _one_error_line(result.stderr)
    assert SECRET not in result.stdout + result.stderr
    assert not list(tmp_path.glob("**/metrics.json"))


@pytest.mark.slow
def test_a_run_says_what_it_skips_as_data_check_does_and_records_what_ran(phantom_copy: Path, tmp_path: Path, capsys):
    """Images in a subfolder of a class folder (and a broken symlink) used to be dropped from runs unsaid;
    data.val_fraction=0.3 holds out 1/3 and says so; the record states the precision that ran, and keeps
    environment reads as written."""
    nested = phantom_copy / "covid-ct" / "CT_COVID" / "more"
    nested.mkdir()
    shutil.copy(phantom_copy / "covid-ct" / "CT_COVID" / "img000.png", nested / "x.png")
    (phantom_copy / "covid-ct" / "CT_NonCOVID" / "gone.png").symlink_to(phantom_copy / "nowhere.png")
    skipped = [
        "covid-ct/CT_COVID/more/ is a folder inside a class folder: not read",
        "covid-ct/CT_NonCOVID/gone.png is a broken symlink: not read",
    ]
    assert data_main(["check", "--root", str(phantom_copy), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert all(f"  - {line}" in out for line in skipped)

    env = {**cli_env(tmp_path / "outputs"), "COVIDCT_DATA": str(phantom_copy), "COVIDCT_CACHE": str(tmp_path / "c")}
    result = run_cli(["experiment=ours", *FAST, "data.val_fraction=0.3"], tmp_path / "outputs", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    [record_path] = (tmp_path / "outputs").glob("ours/fold0-*/metrics.json")
    log = (record_path.parent / "run.log").read_text()
    assert f"site B: 2 entries of its folder not read (first: {skipped[0]})" in log
    assert "data.val_fraction=0.3 is no 1/k: the validation part is one part in 3, 33%" in log
    record = json.loads(record_path.read_text())
    notes = record["run"]["splits"]["notes"]
    # counted in the record, not named (a folder-kind site's paths name its patients)
    assert "site B: 2 entries of its folder not read (`python -m covidct.data check` lists them)" in notes
    assert any(note.startswith("validation part (data.val_fraction=0.3: one part in 3, 33%)") for note in notes)
    assert record["run"]["precision"] == "32-true"
    assert record["config"]["data"]["root"] == "${oc.env:COVIDCT_DATA,data}"  # where it came from, as written
    assert record["config"]["data"]["cache_dir"] == "${oc.env:COVIDCT_CACHE,null}"
    assert os.fspath(tmp_path / "c") not in record_path.read_text()


@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "experiment=glob(*)", "fold=0"],  # the sweeper expands globs and intervals, not the check
        ["-m", "experiment=ours", "model.optimizer.lr=interval(0.001,0.1)"],
        ["experiment=ours", "hydra.mode=MULTIRUN", "fold=0,1"],  # a multirun without -m
        ["-m", "experiment=ours,joint", "fold=0,1,2,3", "seed=range(643,646)", "data.test_sites=[A],[B]"],
        ["-m", "experiment=ours", "+protocol=cpu", "hydra/launcher=joblib"],
    ],
)
def test_the_compose_check_passes_every_sweep_hydra_runs(argv: list[str]):
    from covidct.run import compose_problem

    assert compose_problem(argv) is None


def test_the_compose_check_reads_a_multirun_s_first_job():
    from covidct.run import compose_problem

    argv = ["-m", "experiment=ours,joint", "fold=0,1", "seed=range(643,646)", "model.tua=0.1"]
    assert compose_problem(argv).startswith("cannot compose the config: Could not override 'model.tua'")
