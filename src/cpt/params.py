"""params.yaml loading with DVC-style ``-S section.key=value`` overrides.

Values of overrides are parsed as YAML (``-S train.lr=3e-4`` gives a float, ``-S ingest.sources=[]`` a list), the
same way ``dvc exp run -S`` parses them, so a CLI run and a DVC experiment see identical params.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Iterable

import yaml


class ParamsError(ValueError):
    pass


class _Loader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where ``3e-4`` is a *string*; DVC (ruamel, YAML 1.2) reads it as a float. Resolve
    floats the YAML 1.2 way so ``lr: 3e-4`` means the same to cpt, to DVC and to ``-S train.lr=3e-4``."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - SafeLoader subclass


def load_params(path: str | Path = "params.yaml", overrides: Iterable[str] = ()) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: params file not found")
    with path.open(encoding="utf-8") as fh:
        try:
            params = parse_yaml(fh.read()) or {}
        except yaml.YAMLError as exc:
            raise ParamsError(yaml_error(path, exc)) from None
    if not isinstance(params, dict):
        raise ParamsError(f"{path}: top level must be a mapping, got {type(params).__name__}")
    return apply_overrides(params, overrides)


def yaml_error(path: str | Path, exc: yaml.YAMLError) -> str:
    """A YAML error as one line, ``params.yaml:12:5: not valid YAML: mapping values are not allowed here``
    (PyYAML's own message names ``<unicode string>`` and spans several lines)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    what = getattr(exc, "problem", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
    context = getattr(exc, "context", None)
    return f"{where}: not valid YAML: {what}" + (f" ({context})" if context else "")


def unknown_keys_message(name: str, unknown: list[str], known: Iterable[str]) -> str:
    """``params train: unknown key 'replay_ration' (did you mean 'replay_ratio'?)``: one short line however many keys
    the section has (the keys, each with its comment, are in params.yaml)."""
    import difflib

    known = [str(k) for k in known]
    parts = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
        parts.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return (f"params {name}: unknown key{'s' if len(parts) > 1 else ''} {', '.join(parts)}; unknown params are "
            f"refused, not ignored ({len(known)} known keys: see params.yaml)")


def apply_overrides(params: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    out = copy.deepcopy(params)
    for item in overrides:
        if "=" not in item:
            raise ParamsError(f"override {item!r}: expected section.key=value")
        dotted, raw = item.split("=", 1)
        keys = [k for k in dotted.strip().split(".") if k]
        if not keys:
            raise ParamsError(f"override {item!r}: empty key")
        try:
            value = parse_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ParamsError(f"override {item!r}: value is not valid YAML: {exc}") from exc
        node = out
        for key in keys[:-1]:
            nxt = node.get(key)
            if nxt is None:
                nxt = node[key] = {}
            if not isinstance(nxt, dict):
                raise ParamsError(f"override {item!r}: {key!r} is not a section")
            node = nxt
        node[keys[-1]] = value
    return out


def section(params: dict[str, Any], name: str) -> dict[str, Any]:
    """The stage's own section; a missing section is an empty one (every key then takes its default)."""
    sec = params.get(name) or {}
    if not isinstance(sec, dict):
        raise ParamsError(f"params section {name!r} must be a mapping")
    return sec


def with_defaults(name: str, values: dict[str, Any] | None, defaults: dict[str, Any]) -> dict[str, Any]:
    """``defaults`` overlaid with the user's ``values`` for the params section (or sub-section) ``name``. An unknown
    key is an error, never ignored: a typo such as ``train.replay_ration`` would otherwise silently run the default."""
    from cpt.errors import ConfigError

    values = values or {}
    if not isinstance(values, dict):
        raise ConfigError(f"params {name}: expected a mapping, got {type(values).__name__}")
    unknown = sorted(set(values) - set(defaults))
    if unknown:
        raise ConfigError(unknown_keys_message(name, unknown, sorted(defaults)))
    return {**defaults, **values}


def stage_config(params: dict[str, Any], name: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """The stage's section of ``params`` over the stage's ``defaults`` (see ``with_defaults``)."""
    return with_defaults(name, section(params, name), defaults)


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}`` (lists stay whole, as JSON-able values)."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat
