"""Download and unpack against a local HTTP server serving fixture zips: no network beyond 127.0.0.1."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import types
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from covidct.data.__main__ import main
from covidct.data.download import (
    KAGGLE_DATASET,
    KAGGLE_URL,
    SITE_B_METADATA,
    SITE_B_ZIPS,
    download_site_a,
    download_site_b,
    missing_data_message,
)
from covidct.data.sources import COVID, NON_COVID, list_images
from covidct.errors import DataError

REPO_ROOT = Path(__file__).resolve().parents[1]


def _image(fmt: str, value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (4, 4), value).save(buf, format=fmt)
    return buf.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


class _Server:
    """Serves `files` (URL path -> bytes) and records every requested path."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(self.path)
                body = server.files.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/repo"

    def downloads(self) -> list[str]:
        return [path for path in self.requests if path.endswith(".zip")]


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy from the environment must not see the requests to 127.0.0.1."""
    for name in list(os.environ):
        if name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server()
    thread = threading.Thread(target=srv.httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.httpd.shutdown()
        srv.httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def site_b(server: _Server) -> _Server:
    """Site B as published: one zip with a top-level folder, one without and with macOS junk."""
    server.files["/repo/" + SITE_B_ZIPS["CT_COVID"]] = _zip(
        {
            "CT_COVID/": b"",
            "CT_COVID/covid1.png": _image("PNG", 10),
            "CT_COVID/covid2.jpg": _image("JPEG", 20),
            "CT_COVID/.DS_Store": b"junk",
        }
    )
    server.files["/repo/" + SITE_B_ZIPS["CT_NonCOVID"]] = _zip(
        {
            "normal1.png": _image("PNG", 30),
            "normal2.jpeg": _image("JPEG", 40),
            "__MACOSX/._normal1.png": b"apple double",
            "readme.txt": b"not an image",
        }
    )
    for rel in SITE_B_METADATA:
        server.files[f"/repo/{rel}"] = b"covid1.png\n"
    return server


def _write_site_a(root: Path) -> None:
    for folder, value in (("COVID", 50), ("non-COVID", 60)):
        (root / "sars-cov-2" / folder).mkdir(parents=True)
        (root / "sars-cov-2" / folder / "x.png").write_bytes(_image("PNG", value))


def test_site_b_download_gives_the_layout_sources_reads(
    tmp_path: Path, site_b: _Server, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "data"
    download_site_b(root, base_url=site_b.base_url)

    items = list_images(root, "B")
    assert sorted((p.parent.name, p.name, y) for p, y in items) == [
        ("CT_COVID", "covid1.png", COVID),
        ("CT_COVID", "covid2.jpg", COVID),
        ("CT_NonCOVID", "normal1.png", NON_COVID),
        ("CT_NonCOVID", "normal2.jpeg", NON_COVID),
    ]
    site_dir = root / "covid-ct"
    assert sorted(p.name for p in site_dir.iterdir()) == ["CT_COVID", "CT_NonCOVID", "Data-split"]
    assert (site_dir / "Data-split/COVID/trainCT_COVID.txt").read_bytes() == b"covid1.png\n"
    assert (site_dir / "Data-split/NonCOVID/testCT_NonCOVID.txt").is_file()
    assert "data.group_by=image" in capsys.readouterr().out


def test_rerun_downloads_nothing_and_force_downloads_again(tmp_path: Path, site_b: _Server) -> None:
    download_site_b(tmp_path, base_url=site_b.base_url)
    first = len(site_b.requests)
    assert len(site_b.downloads()) == 2 and first == 2 + len(SITE_B_METADATA)

    download_site_b(tmp_path, base_url=site_b.base_url)
    assert len(site_b.requests) == first

    download_site_b(tmp_path, base_url=site_b.base_url, force=True)
    assert len(site_b.downloads()) == 4 and len(site_b.requests) == 2 * first
    assert len(list_images(tmp_path, "B")) == 4


def test_missing_image_zip_names_the_url_and_leaves_no_partial_files(tmp_path: Path, site_b: _Server) -> None:
    del site_b.files["/repo/" + SITE_B_ZIPS["CT_NonCOVID"]]
    url = f"{site_b.base_url}/{SITE_B_ZIPS['CT_NonCOVID']}"
    with pytest.raises(DataError, match="404") as info:
        download_site_b(tmp_path, base_url=site_b.base_url)
    assert url in str(info.value) and str(tmp_path / "covid-ct" / "CT_NonCOVID") in str(info.value)
    assert sorted(p.name for p in (tmp_path / "covid-ct").iterdir()) == ["CT_COVID"]


@pytest.mark.parametrize("member", ["../evil.png", "CT_COVID/../../evil.png", "/tmp/evil.png"])
def test_zip_slip_member_is_refused(tmp_path: Path, site_b: _Server, member: str) -> None:
    site_b.files["/repo/" + SITE_B_ZIPS["CT_COVID"]] = _zip(
        {"CT_COVID/ok.png": _image("PNG", 1), member: _image("PNG", 2)}
    )
    root = tmp_path / "data"
    with pytest.raises(DataError, match="unsafe member"):
        download_site_b(root, base_url=site_b.base_url)
    assert not list(tmp_path.rglob("evil.png"))
    assert sorted(p.name for p in (root / "covid-ct").iterdir()) == []


def test_missing_metadata_is_a_warning(tmp_path: Path, site_b: _Server, capsys: pytest.CaptureFixture[str]) -> None:
    del site_b.files[f"/repo/{SITE_B_METADATA[0]}"]
    download_site_b(tmp_path, base_url=site_b.base_url)
    err = capsys.readouterr().err
    assert err.startswith("warning:") and f"{site_b.base_url}/{SITE_B_METADATA[0]}" in err
    assert len(list_images(tmp_path, "B")) == 4


def test_missing_data_message(tmp_path: Path, site_b: _Server) -> None:
    message = missing_data_message(tmp_path)
    assert message is not None
    for expected in (
        "site A",
        "site B",
        str(tmp_path / "sars-cov-2" / "non-COVID"),
        str(tmp_path / "covid-ct" / "CT_COVID"),
        f"python -m covidct.data download --root {tmp_path}",
        KAGGLE_URL,
        "data.root=DIR",
        "COVIDCT_DATA",
    ):
        assert expected in message

    download_site_b(tmp_path, base_url=site_b.base_url)
    message = missing_data_message(tmp_path)
    assert message is not None and "- site B:" not in message and KAGGLE_URL in message

    _write_site_a(tmp_path)
    assert missing_data_message(tmp_path) is None


def test_site_a_without_credentials_returns_the_instructions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_CONFIG_DIR"):
        monkeypatch.delenv(name, raising=False)
    message = download_site_a(tmp_path / "data")
    assert message is not None and KAGGLE_URL in message
    assert f"{tmp_path / 'data' / 'sars-cov-2' / 'non-COVID'}/*.png" in message


def test_site_a_through_the_kaggle_api_maps_its_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = _zip(
        {
            "COVID/Covid (1).png": _image("PNG", 1),
            "non-COVID/Non-Covid (1).png": _image("PNG", 2),
            "__MACOSX/COVID/._Covid (1).png": b"junk",
        }
    )
    calls: list[tuple[str, bool]] = []

    def dataset_download_files(dataset: str, path: str, force: bool, unzip: bool) -> None:
        calls.append((dataset, unzip))
        (Path(path) / "sarscov2-ctscan-dataset.zip").write_bytes(archive)

    fake = types.ModuleType("kaggle")
    fake.api = types.SimpleNamespace(dataset_download_files=dataset_download_files)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "kaggle", fake)
    monkeypatch.setenv("KAGGLE_USERNAME", "user")
    monkeypatch.setenv("KAGGLE_KEY", "key")

    assert download_site_a(tmp_path) is None
    assert calls == [(KAGGLE_DATASET, False)]
    assert sorted((p.parent.name, p.name, y) for p, y in list_images(tmp_path, "A")) == [
        ("COVID", "Covid (1).png", COVID),
        ("non-COVID", "Non-Covid (1).png", NON_COVID),
    ]
    assert sorted(p.name for p in (tmp_path / "sars-cov-2").iterdir()) == ["COVID", "non-COVID"]
    assert download_site_a(tmp_path) is None and len(calls) == 1


def test_cli_download_without_kaggle_credentials(tmp_path: Path, site_b: _Server) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAGGLE_")}
    env.update(HOME=str(tmp_path), PYTHONPATH=str(REPO_ROOT))
    root = tmp_path / "data"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "covidct.data",
            "download",
            "--root",
            str(root),
            "--base-url",
            site_b.base_url,
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "SITE A IS NOT DOWNLOADED YET" in result.stdout and KAGGLE_URL in result.stdout
    assert len(list_images(root, "B")) == 4


def test_cli_where(tmp_path: Path, site_b: _Server, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["where", "--root", str(tmp_path)]) == 1
    assert "python -m covidct.data download --root" in capsys.readouterr().out

    download_site_b(tmp_path, base_url=site_b.base_url)
    _write_site_a(tmp_path)
    capsys.readouterr()
    assert main(["where", "--root", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == f"data found under {tmp_path}"


def test_cli_reports_data_errors_without_traceback(
    tmp_path: Path, server: _Server, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["download", "--root", str(tmp_path), "--sites", "B", "--base-url", server.base_url]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: downloading ") and "Traceback" not in err
