"""CSV files that are safe to open in a spreadsheet: every CSV covidct writes (predictions, patient summaries, the
report's tables) goes through `csv_text`, and every one it reads back through `plain_cell`.

A cell that begins with `=`, `+`, `-`, `@`, a tab or a carriage return is a formula to Excel, LibreOffice and
Google Sheets (OWASP's "CSV injection"): a file name or a DICOM PatientID such as `=HYPERLINK(...)` coming from
another institution would run as one. Such a text cell is written with a leading apostrophe, which spreadsheets
show as text; numbers (`-0.25`, `+1e-3`) stay numbers. The csv module quotes but does not neutralise, and no
maintained library does both, hence this small module. The rule is reversible: a cell that already begins with
an apostrophe before one of those characters gets a second one, so `plain_cell` gives back exactly what was
written.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_QUOTE = "'"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _needs_quote(text: str) -> bool:
    body = text.lstrip(_QUOTE)
    return body.startswith(FORMULA_STARTS) and (body != text or not _is_number(text))


def safe_cell(value: Any) -> Any:
    """`value` as a spreadsheet will show it, never run it: a text cell that a spreadsheet would read as a formula
    gets a leading apostrophe; numbers, empty cells and all other text are unchanged."""
    if isinstance(value, str) and _needs_quote(value):
        return _QUOTE + value
    return value


def plain_cell(text: str) -> str:
    """The value `safe_cell` was given, from the cell it wrote."""
    if text.startswith(_QUOTE) and _needs_quote(text[1:]):
        return text[1:]
    return text


def csv_text(rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """The rows as CSV text (a header, then one line per row, `\\n` line ends), every cell through `safe_cell`;
    a missing or None value is an empty cell."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if row.get(key) is None else safe_cell(row[key]) for key in columns})
    return buffer.getvalue()
