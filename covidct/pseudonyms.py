"""Patient identifiers stay at the site: what covidct writes carries a keyed pseudonym of each patient id (and of
the path parts that are one), never the id itself, unless the user asks for raw ids (`patient_ids=raw`).

The pseudonym is HMAC-SHA256 of the id under a secret key, so it is the same patient in every output made with
the same key (runs compare and pool per patient, the report pairs them across methods) while no one without the
key can find an MRN by hashing candidate ids. The key is 32 random bytes in a file of the user's
(`~/.config/covidct/pseudonym.key`, created on first use, readable by the user only; `COVIDCT_PSEUDONYM_KEY` or a
command's `pseudonym_key=` names another). The standard library's hmac and secrets do the cryptography.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from covidct.errors import ConfigError, DataError

PATIENT_IDS = ("pseudonym", "raw")
KEY_ENV = "COVIDCT_PSEUDONYM_KEY"
DEFAULT_KEY_FILE = Path("~/.config/covidct/pseudonym.key")
PREFIX = "pt-"
_KEY_BYTES = 32


def key_file(path: str | Path | None = None) -> Path:
    """The key file in use: `path`, else $COVIDCT_PSEUDONYM_KEY, else the user's default."""
    return Path(path or os.environ.get(KEY_ENV) or DEFAULT_KEY_FILE).expanduser()


def read_key(path: str | Path | None = None) -> bytes:
    """The pseudonym key, created (mode 0600) the first time; a key file that is not one is refused."""
    path = key_file(path)
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(_KEY_BYTES) + "\n")
            try:
                os.link(temp, path)  # whole, or not at all: a parallel first run reads a complete key
            except FileExistsError:
                pass  # another process made it just now: use theirs
            finally:
                os.unlink(temp)
        except OSError as err:
            raise DataError(
                f"cannot create the pseudonym key {path} ({err.strerror or err}); set {KEY_ENV} to a writable "
                "path, or pass pseudonym_key=PATH."
            ) from None
    try:
        key = bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError, UnicodeDecodeError):
        key = b""
    if len(key) < 16:
        raise DataError(
            f"{path} is not a covidct pseudonym key (hex of at least 16 random bytes); restore the right file, or "
            "delete it to start new pseudonyms (outputs made with the old key will then name patients differently)."
        )
    return key


class Pseudonyms:
    """Patient ids, and the path parts equal to one, as the outputs show them (`how`: 'pseudonym' or 'raw')."""

    def __init__(self, how: str = "pseudonym", key: str | Path | None = None):
        if how not in PATIENT_IDS:
            raise ConfigError(f"patient_ids must be {' or '.join(PATIENT_IDS)}, got {how!r}.")
        self.raw = how == "raw"
        self._key = b"" if self.raw else read_key(key)

    @property
    def key_id(self) -> str | None:
        """A public name of the key (HMAC of a fixed label under it), recorded so that outputs made with different
        keys, whose pseudonyms do not match, are told apart; None with raw ids."""
        return None if self.raw else hmac.new(self._key, b"covidct key id", hashlib.sha256).hexdigest()[:8]

    def patient(self, patient_id: str) -> str:
        """The id as written: '' stays '' (no id), a raw id under patient_ids=raw, else its pseudonym."""
        if self.raw or not patient_id:
            return patient_id
        digest = hmac.new(self._key, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()
        return PREFIX + digest[:16]

    def path(self, relative: str, hidden: Mapping[str, str]) -> str:
        """A path relative to a site or image folder with every part that names a patient (a key of `hidden`: a
        folder named by its patient, as hospital exports and folder-kind sites are) replaced by its pseudonym."""
        if self.raw:
            return relative
        return PurePosixPath(*(hidden.get(part, part) for part in PurePosixPath(relative).parts)).as_posix()

    def rows(
        self, rows: Iterable[Mapping[str, Any]], aliases: Mapping[str, Iterable[str]] | None = None
    ) -> list[dict[str, Any]]:
        """Prediction rows as the outputs show them: their `patient`, and in every row's `file` each part that is
        a patient's id or one of its `aliases` (e.g. a DICOM PatientName, or the folder a folder-kind site names
        its patients by), in the rows of that patient and in any other (a picture or a broken link beside its
        slices names the folder too)."""
        rows = [dict(row) for row in rows]
        hidden: dict[str, str] = {}
        for row in rows:
            raw = str(row.get("patient") or "")
            if raw:
                for name in (raw, *(aliases or {}).get(raw, ())):
                    if name:
                        hidden.setdefault(name, self.patient(raw))
        for row in rows:
            if "patient" in row:
                row["patient"] = self.patient(str(row["patient"] or ""))
            if "file" in row:
                row["file"] = self.path(row["file"], hidden)
        return rows
