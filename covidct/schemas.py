"""Schemas of config blocks (a site file, a `table1` block, a run's options): a dataclass's fields give OmegaConf
each key's type and default (none: required); a field's `rule` adds the range no type states. A refusal is one
ConfigError line naming the source, the key and what it may be, with OmegaConf's words in brackets."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, field, fields
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from covidct.errors import ConfigError

_BUILT: dict[type, Any] = {}  # each schema's structured config


def rule(allowed: str, test: Callable[[Any], Any] | None = None, default: Any = MISSING, block: str = "") -> Any:
    """A schema field that `must <allowed>`: be of its type and (unless null) pass `test`; in its own `block`."""
    return field(default=default, metadata={"allowed": allowed, "test": test, "block": block})


def dotted(spec: Field, block: str = "") -> str:
    """A schema field's key in its config: `<block>.<name>`."""
    return ".".join(filter(None, (spec.metadata.get("block") or block, spec.name)))


def checked(schema: type, values: Any, where: str, block: str = "", strict: bool = False) -> dict[str, Any]:
    """`values` over the dataclass `schema`'s defaults as plain data (interpolations as written), or a ConfigError
    '<where>: <block>.<key> ...'. `strict` also refuses a value OmegaConf would convert (the text '3' to an
    integer, 1 to true), for a config that is used as written, not as converted."""
    specs = {spec.name: spec for spec in fields(schema)}
    names, at = {key: dotted(spec, block) for key, spec in specs.items()}, f"{where}: " if where else ""
    must = {key: spec.metadata.get("allowed") or f"be of type {spec.type}" for key, spec in specs.items()}
    if not isinstance(values, Mapping):
        raise ConfigError(f"{at}{block or 'it'} must be a mapping with keys {', '.join(specs)}, got {values!r}")
    if schema not in _BUILT:  # built once: a copy takes a fifth of the time
        _BUILT[schema] = OmegaConf.structured(schema)
    typed = OmegaConf.merge(_BUILT[schema])
    OmegaConf.set_readonly(typed, False)  # a frozen dataclass's config is read-only
    for key, value in values.items():
        try:
            typed[key] = value
            read = OmegaConf.to_container(typed, resolve=False)[key] if strict else value  # as written: equal, of
            same = type(value) is type(read) or (type(value), type(read)) == (int, float)  # its type, or NaN
            why = "" if value != value or (value == read and same) else f"OmegaConf reads it as {read!r}"
        except OmegaConfBaseException as err:
            why = str(err).splitlines()[0]
        if why and key not in specs:
            unknown = f"{block}.{key}".lstrip(".")
            raise ConfigError(f"{at}{unknown} is unknown; allowed keys: {', '.join(specs)} ({why})")
        if why:
            raise ConfigError(f"{at}{names[key]} must {must[key]}, got {value!r} ({why})")
    try:
        plain = OmegaConf.to_container(typed, resolve=False, throw_on_missing=True)
    except MissingMandatoryValue as err:
        key, why = err.full_key, str(err).splitlines()[0]
        raise ConfigError(f"{at}{names[key]} is missing: it must {must[key]} ({why})") from None
    for key, spec in specs.items():
        test = spec.metadata.get("test")
        if test and plain[key] is not None and not test(plain[key]):
            raise ConfigError(f"{at}{names[key]} must {must[key]}, got {values.get(key, plain[key])!r}")
    return plain
