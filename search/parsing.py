"""Parsers for command-line values. Each refuses bad input with a ValueError naming the value and the rule."""
from __future__ import annotations

import math

import re

_BYTES = re.compile(r"^\s*(\d+(?:\.\d+)?(?:e\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_dims(text: str) -> dict[str, int]:
    """'user_id=16,item_id=8' -> {'user_id': 16, 'item_id': 8}."""
    dims: dict[str, int] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, eq, value = part.partition("=")
        name, value = name.strip(), value.strip()
        if not eq or not name:
            raise ValueError(f"dims entry {part!r} is not NAME=INT; write e.g. --dims user_id=16,item_id=8")
        if not re.fullmatch(r"[+-]?\d+", value):
            raise ValueError(f"dim for '{name}' is {value!r}, but must be an integer >= 1")
        if int(value) < 1:
            raise ValueError(f"dim for '{name}' is {int(value)}, but must be >= 1")
        if name in dims:
            raise ValueError(f"dim for '{name}' is given twice; give each feature once")
        dims[name] = int(value)
    return dims


def parse_bytes(text: str) -> int:
    """'250000', '2.5MB', '64KiB', '1e6' -> bytes (k/M/G are powers of 1000, Ki/Mi/Gi of 1024)."""
    m = _BYTES.match(str(text))
    if not m:
        raise ValueError(f"memory budget {text!r} is not a size; write e.g. 250000, 2.5MB or 64KiB")
    number, unit = float(m.group(1)), (m.group(2) or "").lower()
    base = unit[:1] if unit not in ("b", "") else ""
    scale = _UNITS[base] if "i" not in unit else 1024 ** (" kmgt".index(base))
    if not math.isfinite(number * scale):
        raise ValueError(f"memory budget {text!r} is not a finite size; write e.g. 250000, 2.5MB or 64KiB")
    value = int(number * scale)
    if value < 1:
        raise ValueError(f"memory budget {text!r} is {value} bytes, but must be >= 1")
    return value


def parse_list(text: str | None) -> list[str]:
    return [p.strip() for p in (text or "").split(",") if p.strip()]


def feature_columns(features: str | None, multi: str | None) -> tuple[list[str], list[str]]:
    """--features and --multi as lists; `--features user_id,item_id --multi tags` reads as three features, one of
    them multi-valued (a --multi column not listed in --features joins them)."""
    names, multi_names = parse_list(features), parse_list(multi)
    if names:
        names += [m for m in multi_names if m not in names]
    return names, multi_names


def parse_ints(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(p) for p in parse_list(text))
    except ValueError:
        raise ValueError(f"{what} is {text!r}, but must be comma-separated integers, e.g. 64,32") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{what} is {text!r}, but must be comma-separated integers >= 1, e.g. 64,32")
    return values


# How a table or MovieLens is read (CLI dests): recorded with a search (cli.data_options) and read back by confirm
DATA_OPTIONS = ("label", "features", "multi", "sep", "positive_threshold", "positive_label", "time_column", "delimiter")


def load_kwargs(options) -> dict:
    """``DATA_OPTIONS``-named values (as the CLI parses them, or as text from a run's ``dataset.*`` params) as
    ``pipelines.load``'s keyword arguments."""
    features, multi = feature_columns(options.get("features"), options.get("multi"))
    threshold = options.get("positive_threshold")
    return {"label": options.get("label"), "features": features or None, "multi": multi or None,
            "sep": options.get("sep") or "|", "threshold": None if threshold is None else float(threshold),
            "time": options.get("time_column"), "delimiter": options.get("delimiter"),
            "positive_label": options.get("positive_label")}
