"""A CSV/TSV (optionally compressed) or Parquet table as a RawDataset: the named feature columns plus a label."""
from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .encode import _spell, joined
from .schema import Feature, LabelRule, RawDataset, binarize_label

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".csv", ".tsv", ".txt")
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zip")  # what pandas infers from the file name
PARQUET_SUFFIXES = (".parquet", ".pq")
DELIMITERS = (",", "\t", ";", "|")  # candidates when the delimiter is detected
NA_STRINGS = (  # pandas' default missing-value strings, for the label and time columns of a CSV
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A", "NA",
    "NULL", "NaN", "None", "n/a", "nan", "null",
)
# an integer written as a float ("196.0", " 196.0 " as encode strips it); pure digits ("00123") are not touched. ASCII
# whitespace spelled out: with `\s` pandas runs the regex in Python, not pyarrow (4.2 s vs 0.15 s on 2M cells)
WHOLE_FLOAT = r"^[\t\n\x0b\x0c\r ]*([+-]?\d+)\.0+[\t\n\x0b\x0c\r ]*$"


def table_format(path: Path) -> str | None:
    """'csv', 'parquet', or None when the suffix is not a supported table format."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in PARQUET_SUFFIXES:
        return "parquet"
    if suffixes and suffixes[-1] in COMPRESSION_SUFFIXES:
        suffixes = suffixes[:-1]
    return "csv" if suffixes and suffixes[-1] in TEXT_SUFFIXES else None


def supported_formats() -> str:
    return (
        f"{', '.join(TEXT_SUFFIXES)} (optionally compressed: {', '.join(COMPRESSION_SUFFIXES)}) "
        f"and Parquet ({', '.join(PARQUET_SUFFIXES)})"
    )


def load_table(
    path: str | Path,
    label: str,
    features: Sequence[str],
    multi: Sequence[str] = (),
    sep: str = "|",
    threshold: float | None = None,
    time: str | None = None,
    buckets: dict[str, tuple[float, ...]] | None = None,
    delimiter: str | None = None,
    positive_label: str | None = None,
) -> RawDataset:
    """Read only ``features``, ``label`` and ``time`` from the table at ``path``.

    ``multi`` names the multi-valued features (cells split on ``sep``); ``buckets`` maps numeric features to bucket
    edges; ``threshold`` binarizes a numeric label (``>= threshold`` is positive); ``delimiter`` is detected when
    not given (tab for .tsv).
    """
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ValueError(f"table file '{path}' does not exist; check the path")
    fmt = table_format(path)
    if fmt is None:
        suffix = "".join(path.suffixes) or "(none)"
        raise ValueError(
            f"file '{path}' has suffix '{suffix}', which is not a table format; supported: {supported_formats()}"
        )
    buckets = dict(buckets or {})
    _check_columns(label, list(features), list(multi), time, buckets)
    needed = list(dict.fromkeys([*features, label, *([time] if time else [])]))
    if fmt == "parquet":
        frame, delim = _read_parquet(path, needed, list(multi), sep), None
    else:
        try:
            delim = _delimiter(path, delimiter)
            frame = _read_csv(path, needed, delim, text=[f for f in features if f not in buckets])
        except pd.errors.EmptyDataError as e:
            raise ValueError(f"table file '{path}' is empty; give a file with a header row") from e
        except UnicodeDecodeError as e:
            byte, offset = e.object[e.start:e.start + 1].hex(), _bad_utf8_offset(path, e.start)
            raise ValueError(
                f"file '{path}' is not UTF-8 text (byte 0x{byte} at offset {offset}); re-save it as UTF-8"
            ) from None
    if len(frame) == 0:
        raise ValueError(f"table file '{path}' has a header but no data rows; give a file with rows")
    y = binarize_label(frame[label], LabelRule(label, threshold, positive_label))
    for name in features:
        _check_learnable(frame[name], name, name in buckets)
    specs = tuple(Feature(n, multi=n in multi, sep=sep, buckets=buckets.get(n)) for n in features)
    meta = {"source": str(path), "format": fmt, "delimiter": delim, "label": label, "threshold": threshold}
    log.info("loaded %s: %d rows, positive rate %.3f", path, len(y), y.mean() if len(y) else float("nan"))
    return RawDataset(
        path.name.split(".")[0], frame[list(features)].reset_index(drop=True), specs, y,
        time=_time(frame[time], time) if time else None, meta=meta,
    )


def _check_columns(label: str, features: list[str], multi: list[str], time: str | None, buckets: dict) -> None:
    if not features:
        raise ValueError("no feature columns given; name them, e.g. --features user_id,item_id")
    dupes = sorted({f for f in features if features.count(f) > 1})
    if dupes:
        raise ValueError(f"feature '{dupes[0]}' is listed twice in the features; list each column once")
    if label in features:
        raise ValueError(f"label column '{label}' is also listed as a feature; remove it from the features")
    if time is not None and time == label:
        raise ValueError(f"time column '{time}' is also the label column; give a timestamp column")
    for kind, names in (("multi-valued", multi), ("bucketed", list(buckets))):
        for name in names:
            if name not in features:
                raise ValueError(f"{kind} column '{name}' is not among the features; add it to the features")
    for name, edges in buckets.items():
        if name in multi:
            raise ValueError(f"feature '{name}' is multi-valued and cannot also be bucketed; choose one")
        if len(edges) == 0 or any(b <= a for a, b in zip(edges, edges[1:])):
            raise ValueError(f"bucket edges for '{name}' are {tuple(edges)}, but must be non-empty and increasing")


def _delimiter(path: Path, given: str | None) -> str:
    if given is not None:
        delim = {"\\t": "\t", "tab": "\t"}.get(given, given)  # a shell passes "\t" as two characters
        if len(delim) != 1:
            raise ValueError(f"--delimiter is {given!r}, but must be exactly one character, e.g. ',' or tab")
        return delim
    if ".tsv" in (s.lower() for s in path.suffixes):
        return "\t"
    # the first lines as whole strings (a separator that never occurs), read through pandas so compression works
    head = pd.read_csv(
        path, sep="\x1f", header=None, nrows=20, dtype=str, quoting=csv.QUOTE_NONE, skip_blank_lines=True,
        keep_default_na=False,
    )
    sample = "\n".join(head.iloc[:, 0])
    try:
        return csv.Sniffer().sniff(sample, delimiters="".join(DELIMITERS)).delimiter
    except csv.Error:  # nothing consistent, e.g. a single column
        return ","


def _read_csv(path: Path, needed: list[str], delim: str, text: list[str]) -> pd.DataFrame:
    columns = list(pd.read_csv(path, sep=delim, nrows=0).columns)
    # the header as written: pandas renames a second 'user' to 'user.1', which would read the wrong column silently
    header = list(pd.read_csv(path, sep=delim, header=None, nrows=1, dtype=str, keep_default_na=False).iloc[0])
    _check_unique(path, needed, header)
    _check_present(path, needed, columns, delim)
    # categorical columns as text, so ids like "00123" keep their leading zeros; in them only an empty cell is
    # missing ('NA' is Namibia and 'None' a value, as Parquet keeps them); the label and time keep pandas' NA strings
    na_values = {c: [""] if c in text else list(NA_STRINGS) for c in needed}
    try:
        frame = pd.read_csv(
            path, sep=delim, usecols=needed, dtype={c: str for c in text}, keep_default_na=False, na_values=na_values
        )
    except pd.errors.ParserError as e:
        raise ValueError(f"could not parse '{path}' with delimiter {delim!r}: {e}; check --delimiter") from e
    _check_field_counts(path, delim)
    for c in text:  # pandas writes int ids with NaN as floats: "196.0" is "196", as encode.normalize spells 196.0
        frame[c] = frame[c].str.replace(WHOLE_FLOAT, r"\1", regex=True)
    return frame


def _check_field_counts(path: Path, delim: str) -> None:
    """Refuse a row with more or fewer fields than the header. pandas reads only the needed columns (``usecols``), so
    it drops a long row's extra fields without a word, and pads a short row with empty cells: a row shifted by an
    unquoted delimiter would be read as wrong values. pyarrow's tokenizer counts the fields (one C pass, no values
    converted: ~0.1 s for 2M rows); only when a row is off is the file read again, in Python, for its line number."""
    import pyarrow
    import pyarrow.csv as pacsv
    from pandas.io.common import get_handle

    first = []

    def invalid(row) -> str:
        if not row.text.strip():  # a line of spaces: pandas skips it as a blank line
            return "skip"
        first.append(row)
        return "error"  # one is enough to refuse the file: stop there

    def count(source) -> None:
        pacsv.read_csv(
            source,
            read_options=pacsv.ReadOptions(use_threads=False),
            parse_options=pacsv.ParseOptions(delimiter=delim, newlines_in_values=True, invalid_row_handler=invalid),
            convert_options=pacsv.ConvertOptions(include_columns=["\x00"], include_missing_columns=True),  # no values
        )

    try:
        if path.suffix.lower() in COMPRESSION_SUFFIXES:  # pandas' decompression: pyarrow has no .zip or .xz
            with get_handle(path, "rb", compression="infer", is_text=False) as handle:
                count(handle.handle)
        else:
            count(str(path))
    except pyarrow.ArrowInvalid as e:
        if not first:  # pandas read the file but pyarrow not (e.g. a row longer than its block): left unchecked
            log.warning("could not check the field count of each row of '%s': %s", path, e)
            return
    if not first:
        return
    row = first[0]
    line, fields, header = _off_row(path, delim) or (row.number, row.actual_columns, row.expected_columns)
    fix = f"quote a value that contains {delim!r}" if fields > header else "give each column a field, empty if missing"
    raise ValueError(
        f"line {line} of '{path}' has {fields} fields, but the header has {header}; fix the row ({fix}), or pass the "
        "right --delimiter"
    )


def _off_row(path: Path, delim: str) -> tuple[int, int, int] | None:
    """(line, fields, header fields) of the first row whose field count is not the header's, lines counted as an
    editor counts them (blank lines and a quoted value's newlines too); None when Python's csv module finds none."""
    from pandas.io.common import get_handle

    with get_handle(path, "r", encoding="utf-8", compression="infer", errors="replace") as handle:
        rows = csv.reader(handle.handle, delimiter=delim)
        try:
            header = next(rows)
            for row in rows:
                if len(row) != len(header) and not (len(row) <= 1 and not "".join(row).strip()):  # blank: skipped
                    return rows.line_num - sum(f.count("\n") for f in row), len(row), len(header)
        except (csv.Error, StopIteration):  # e.g. a field past csv's size limit: pyarrow's row number instead
            return None
    return None


def _bad_utf8_offset(path: Path, fallback: int) -> int:
    """The offset of the first byte that is not UTF-8 in the (decompressed) file; pandas reports one in its chunk."""
    import codecs

    from pandas.io.common import get_handle

    decoder, done = codecs.getincrementaldecoder("utf-8")(), 0
    try:
        with get_handle(path, "rb", compression="infer", is_text=False) as handle:
            while block := handle.handle.read(1 << 20):
                try:
                    decoder.decode(block)
                except UnicodeDecodeError as e:
                    return done + e.start - len(decoder.getstate()[0])
                done += len(block)
    except OSError:
        pass
    return fallback


def _read_parquet(path: Path, needed: list[str], multi: list[str], sep: str) -> pd.DataFrame:
    """The needed columns; a list column of a multi-valued feature becomes its 'a|b' text, and a struct or undeclared
    list column is refused (told apart by the file's schema, so flat columns are not scanned cell by cell)."""
    import pyarrow
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        _check_unique(path, needed, schema.names)
        _check_present(path, needed, schema.names, None)
        frame = pd.read_parquet(path, columns=needed)
    except pyarrow.ArrowException as e:  # a corrupt or truncated file: pyarrow's message does not name it
        raise ValueError(f"'{path}' is not a readable Parquet file ({e}); check the file or convert it again") from None
    for name in needed:
        kind = schema.field(name).type
        if pyarrow.types.is_struct(kind) or pyarrow.types.is_map(kind):
            raise ValueError(
                f"column '{name}' holds structs (dict values), which are not categorical values; flatten it into one "
                "column per field"
            )
        if pyarrow.types.is_list(kind) or pyarrow.types.is_large_list(kind) or pyarrow.types.is_fixed_size_list(kind):
            if name not in multi:
                raise ValueError(f"column '{name}' holds lists; declare it with --multi {name}")
            multi_feature = Feature(name, multi=True, sep=sep)
            frame[name] = frame[name].map(lambda cell: joined(cell, multi_feature), na_action="ignore")
    return frame


def _check_unique(path: Path, needed: list[str], names: list) -> None:
    dupes = [c for c in needed if names.count(c) > 1]
    if dupes:
        raise ValueError(
            f"column '{dupes[0]}' appears {names.count(dupes[0])} times in the header of '{path.name}', so which one "
            "to read is ambiguous; rename or drop the extra ones"
        )


def _check_present(path: Path, needed: list[str], columns: list[str], delim: str | None) -> None:
    missing = [c for c in needed if c not in columns]
    if not missing:
        return
    message = f"column '{missing[0]}' is not in '{path.name}'; available columns: {', '.join(map(str, columns))}"
    spaced = [c for c in columns if isinstance(c, str) and c != missing[0] and c.strip() == missing[0]]
    if spaced:
        sides = (("leading", spaced[0][:1].isspace()), ("trailing", spaced[0][-1:].isspace()))
        where = " and ".join(side for side, has in sides if has)
        message = (
            f"column '{missing[0]}' is not in '{path.name}', but the file's header has {spaced[0]!r} with a {where} "
            f"space; remove the space from the header, or name the column {spaced[0]!r}"
        )
        raise ValueError(message)
    if delim is not None and len(columns) == 1:
        others = [d for d in DELIMITERS if d != delim and d in str(columns[0])]
        if others:
            message += (
                f". The header parsed as one column that contains {others[0]!r}, so the delimiter {delim!r} looks "
                f"wrong; pass --delimiter {others[0]!r}"
            )
    raise ValueError(message)


def _check_learnable(values: pd.Series, name: str, numeric: bool) -> None:
    if numeric:
        parsed = pd.to_numeric(values, errors="coerce")
        bad = values[parsed.isna() & values.notna()]
        if len(bad):
            raise ValueError(
                f"bucketed feature '{name}' holds non-numeric value {bad.iloc[0]!r}; give a numeric column"
            )
    uniq = values.dropna().unique()
    # categories as the encoder spells them (' 5' and '5' are one): only a handful of raw values can collapse to one
    spelled = {_spell(v) for v in uniq} - {""} if len(uniq) <= 20 else uniq
    if len(spelled) <= 1:
        only = f"only the value {next(iter(spelled))!r}" if len(spelled) else "only missing values"
        raise ValueError(f"feature '{name}' has {only}, so it cannot be learned; drop it from the features")


def _time(values: pd.Series, name: str) -> np.ndarray:
    """A timestamp column as int64: numbers as they are, dates/times as Unix seconds."""
    if values.isna().any():
        raise ValueError(f"time column '{name}' has {int(values.isna().sum())} missing values; fill or drop those rows")
    numbers = pd.to_numeric(values, errors="coerce")  # also digits read as text (a time column that is a feature)
    if numbers.notna().all():
        return numbers.to_numpy().astype(np.int64)
    if pd.api.types.is_datetime64_any_dtype(values):
        stamps = pd.to_datetime(values, utc=True)
    else:  # text: ISO 8601 only, so a day-first '08/01/2024' is refused, not read month-first
        try:
            stamps = pd.to_datetime(values, utc=True, format="ISO8601")
        except (ValueError, TypeError, OverflowError):
            bad = next((v for v in values.unique() if not _iso(v)), values.iloc[0])
            raise ValueError(
                f"time column '{name}' holds {bad!r}, neither a number nor an ISO 8601 date/time; convert the column "
                "to YYYY-MM-DD[THH:MM[:SS]] or Unix seconds"
            ) from None
    return ((stamps - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).to_numpy(np.int64)


def _iso(value) -> bool:
    try:
        pd.to_datetime(pd.Series([value]), utc=True, format="ISO8601")
    except (ValueError, TypeError, OverflowError):
        return False
    return True
