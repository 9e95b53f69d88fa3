"""What the command lines share: key=value arguments, and our errors as one line instead of a traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any, ParamSpec

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from covidct.errors import ConfigError, CovidCTError

P = ParamSpec("P")
USAGE_ERROR = 2  # the exit status of a CovidCTError: bad arguments, config or data


def user_message(err: CovidCTError) -> str:
    """The message alone: errors raised in DataLoader workers arrive wrapped in the worker's traceback."""
    text = str(err).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text


def cli_errors(main: Callable[P, int | None]) -> Callable[P, int | None]:
    """Make a CLI's `main` print a CovidCTError as 'error: <message>' on stderr and return USAGE_ERROR."""

    @functools.wraps(main)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> int | None:
        try:
            return main(*args, **kwargs)
        except CovidCTError as err:
            print(f"error: {user_message(err)}", file=sys.stderr)
            return USAGE_ERROR

    return guarded


def usage(doc: str) -> str:
    """A command's usage line: the first `...` span of its module docstring, on one line (the two cannot differ)."""
    return " ".join(doc.split("`")[1].split())


def parse_args(schema: type, argv: Sequence[str] | None, usage: str) -> Any:
    """key=value arguments over a dataclass of defaults; unknown, missing or mistyped keys become ConfigErrors."""
    argv = sys.argv[1:] if argv is None else list(argv)
    valid = ", ".join(f.name for f in fields(schema))
    loose = [arg for arg in argv if "=" not in arg]
    if loose:
        raise ConfigError(f"arguments are key=value, got {loose[0]!r}. Usage: {usage}")
    try:
        given = OmegaConf.from_cli(argv)
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot parse the arguments: {str(err).splitlines()[0]}") from None
    unknown = sorted(set(given) - {f.name for f in fields(schema)})
    if unknown:
        raise ConfigError(f"unknown argument(s) {', '.join(unknown)}; valid ones are {valid}.")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(schema), given)
    except OmegaConfBaseException as err:
        raise ConfigError(f"invalid value for {err.full_key}: {str(err).splitlines()[0]}") from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"missing required argument(s) {', '.join(missing)}. Usage: {usage}")
    return OmegaConf.to_object(cfg)
