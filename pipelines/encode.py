"""Train-only vocabularies and compact integer encodings.

Index 0 of every vocabulary is the unknown bucket. It receives, in one documented way:
values never seen in the training split, values rarer than ``min_freq`` in it, and missing values (NaN/None/"").
A present value is spelled as one string token (``normalize``): 196, 196.0 and "196" are "196"; a bool is "True" or
"False" in every column type (as a bool column spells it), never "1" or "0", and so is a bool written as text in any
case ("true", "FALSE": a CSV's bools, which a client may send as JSON true). Leading and trailing whitespace is not
part of a value (" 5 " is "5", as a multi-valued cell's tokens are stripped), so a cell of only whitespace is missing.
A multi-valued cell is split on its separator; an empty or missing cell becomes the one-element bag ``[0]``. A
list-like cell (a Parquet list, a JSON array: list, tuple or numpy array) is the text its tokens joined by the
separator give (``joined``), in training and when scoring; it is refused in a single-valued column, as is a mapping.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .schema import Feature

UNKNOWN = 0


def normalize(values: pd.Series) -> pd.Series:
    """Raw values as strings, so 196, 196.0 and "196" are one category; missing stays missing (NaN)."""
    if pd.api.types.is_float_dtype(values):
        filled = values.fillna(0)
        # whole numbers as ints ("196"); inf and values past int64 keep their float spelling ("inf", "1e+20")
        whole = values.notna() & (filled == np.floor(filled)) & (filled.abs() < 2.0**63)
        out = values.astype(object).where(~whole, filled.where(whole, 0).astype(np.int64).astype(str))
        out = out.where(values.isna() | whole, values.astype(str))
        return out.where(values.notna(), np.nan)
    out = values.astype(object)
    spelled = out.map(_spell, na_action="ignore")  # an object column's 196.0 is "196" too (a Python loop: on uniques)
    missing = out.isna() | (spelled == "")
    return spelled.where(~missing, np.nan)


def _spell(value) -> str:
    """A present value's category string: a whole float as its int ("196"), inf and floats past int64 as floats,
    a bool (Python or numpy) as "True"/"False", apart from 1 and 0, and "true"/"false" text in any case the same way;
    text without leading or trailing whitespace.

    The one rule training (``Encoder.fit``) and scoring (``transform``, either path) share, so a served ' 5' finds
    training's '5'; "" (all whitespace) is then missing in both."""
    if isinstance(value, (float, np.floating)) and math.isfinite(value) and value == math.floor(value) \
            and abs(value) < 2.0**63:
        return str(int(value))
    text = str(value).strip()
    if len(text) in (4, 5) and text.lower() in ("true", "false"):
        return text.capitalize()
    return text


_LISTS = (list, tuple, np.ndarray)


def joined(cell, f: Feature):
    """A list-like cell as the text of a multi-valued cell: its present elements spelled and joined by ``f.sep``
    (an empty list is missing, as an empty cell). The one rule the table reader (Parquet list columns) and scoring
    (JSON arrays, lists in a frame) share; refused in a single-valued feature or when an element holds the separator."""
    if not f.multi:
        raise ValueError(f"column '{f.name}' holds a list ({_short(cell)}), but feature '{f.name}' takes one value "
                         "per row; give one value (only a multi-valued feature takes a list)")
    tokens = [_spell(t) for t in cell if not _is_missing(t)]
    for token in tokens:
        if f.sep in token:
            raise ValueError(f"column '{f.name}' has the list element {token!r}, which contains the separator "
                             f"{f.sep!r}; pass another --sep")
    return f.sep.join(t for t in tokens if t) or np.nan


def _flat(cell, f: Feature):
    """A cell with any list in it joined (``joined``); a mapping refused; a scalar as it is."""
    if isinstance(cell, _LISTS):
        return joined(cell, f)
    if isinstance(cell, dict):
        raise ValueError(f"column '{f.name}' holds a mapping ({_short(cell)}), which is not a categorical value; "
                         "give one value" + (" or a list" if f.multi else ""))
    return cell


def _is_missing(value) -> bool:
    try:
        return bool(pd.isna(value))  # None, NaN, pd.NA, NaT
    except (TypeError, ValueError):  # not a scalar
        return False


def _short(cell) -> str:
    text = repr(cell.tolist() if isinstance(cell, np.ndarray) else cell)
    return text if len(text) <= 40 else text[:37] + "..."


def bucketize(values: pd.Series, edges: tuple[float, ...]) -> pd.Series:
    """Numeric values to interval labels ("[18, 25)") at ``edges``; below the first edge is "<e0", above ">=eN"."""
    numeric = pd.to_numeric(values, errors="coerce")
    bins = [-np.inf, *edges, np.inf]
    labels = [f"<{edges[0]:g}"] + [f"[{a:g}, {b:g})" for a, b in zip(edges, edges[1:])] + [f">={edges[-1]:g}"]
    out = pd.cut(numeric, bins=bins, labels=labels, right=False).astype(object)
    return out.where(numeric.notna(), np.nan)


@dataclass
class Vocabulary:
    """Categories of one feature, fitted on the training split; position i+1 is category i's index."""

    feature: Feature
    categories: list[str]
    counts: np.ndarray  # training frequency per index (index 0 = unknown/rare/missing)
    _index: pd.Index | None = field(default=None, init=False, repr=False, compare=False)
    _codes: dict[str, int] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def size(self) -> int:
        return len(self.categories) + 1

    def lookup(self, values: pd.Series) -> np.ndarray:
        """Vectorised mapping of normalized raw values to indices; unseen -> 0."""
        if self._index is None:
            self._index = pd.Index(self.categories)  # built once: its hash table serves every later lookup
        idx = self._index.get_indexer(values)  # -1 where unseen or NaN
        return (idx + 1).astype(np.int32)

    def code(self, token: str | None) -> int:
        """One normalized value's index (unseen or missing -> 0): ``lookup`` for a single cell."""
        if self._codes is None:
            self._codes = {c: i for i, c in enumerate(self.categories, 1)}  # built once, on first use
        return self._codes.get(token, UNKNOWN)


@dataclass
class Column:
    """One encoded feature: ``values`` (int32) per row, or flat values plus ``offsets`` (int64, n+1) for bags."""

    values: np.ndarray
    offsets: np.ndarray | None = None

    def take(self, rows: np.ndarray) -> Column:
        if self.offsets is None:
            return Column(self.values[rows])
        starts, ends = self.offsets[rows], self.offsets[rows + 1]
        lengths = ends - starts
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # gather variable-length slices without a Python loop over rows
        flat = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
        return Column(self.values[flat], offsets)


@dataclass
class Encoded:
    """Encoded rows of one split: a Column per feature and a float32 label."""

    columns: dict[str, Column]
    label: np.ndarray

    def __len__(self) -> int:
        return len(self.label)

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays: values, offsets and labels."""
        cols = sum(c.values.nbytes + (c.offsets.nbytes if c.offsets is not None else 0) for c in self.columns.values())
        return cols + self.label.nbytes

    def take(self, rows: np.ndarray) -> Encoded:
        return Encoded({k: c.take(rows) for k, c in self.columns.items()}, self.label[rows])

    def digest(self, h: "hashlib._Hash") -> None:
        for name in sorted(self.columns):
            col = self.columns[name]
            h.update(name.encode())
            h.update(np.ascontiguousarray(col.values).tobytes())
            if col.offsets is not None:
                h.update(np.ascontiguousarray(col.offsets).tobytes())
        h.update(np.ascontiguousarray(self.label).tobytes())


class Encoder:
    """Vocabularies for every feature, fitted on training rows only; transforms raw frames to ``Encoded``.

    Both directions work on the distinct raw values of a column (``pd.factorize``), then gather per row: logs repeat
    values heavily, so splitting and normalizing happen once per distinct cell, not once per row.
    """

    def __init__(self, vocabs: dict[str, Vocabulary]):
        self.vocabs = vocabs

    @property
    def features(self) -> tuple[Feature, ...]:
        return tuple(v.feature for v in self.vocabs.values())

    @classmethod
    def fit(cls, frame: pd.DataFrame, features: tuple[Feature, ...], min_freq: int = 1) -> Encoder:
        if min_freq < 1:
            raise ValueError(f"min_freq is {min_freq}, but must be >= 1")
        vocabs = {}
        for f in features:
            codes, uniques = _factorize(frame[f.name], f)
            cell_counts = np.bincount(codes[codes >= 0], minlength=len(uniques))
            tokens, token_cells = _unique_tokens(pd.Series(uniques), f)
            weights = pd.Series(cell_counts[token_cells], index=tokens.to_numpy())
            counts = weights[tokens.notna().to_numpy()].groupby(level=0, sort=False).sum()
            kept = counts[counts >= min_freq]
            categories = sorted(kept.index.tolist())
            freq = np.zeros(len(categories) + 1, dtype=np.int64)
            freq[1:] = kept.reindex(categories).to_numpy()
            total = int(cell_counts[token_cells].sum()) + int((codes < 0).sum())  # missing cells count once
            freq[0] = total - int(freq[1:].sum())
            vocabs[f.name] = Vocabulary(f, categories, freq)
        return cls(vocabs)

    # Up to this many rows a column is encoded cell by cell in Python (``_encode_cells``): the vectorised path costs
    # ~1 ms of pandas per column however few the rows (factorize, normalize, an Index lookup), nearly all of an
    # online request's time, while the same rules per cell cost about a microsecond. MovieLens' 8 columns: 1 row
    # 0.3 ms cell by cell vs 8.7 ms, 512 rows 2.7 vs 11.9 ms, even at ~1,500 rows. Both give the same codes
    # (tests/pipelines/test_encode.py checks them against each other on random typed columns).
    SMALL_FRAME = 512

    def transform(self, frame: pd.DataFrame) -> dict[str, Column]:
        missing = [name for name in self.vocabs if name not in frame.columns]
        if missing:
            raise ValueError(f"column '{missing[0]}' is missing from the input; it must hold feature '{missing[0]}'")
        out = {}
        small = len(frame) <= self.SMALL_FRAME
        for name, vocab in self.vocabs.items():
            f = vocab.feature
            if small and not f.buckets:  # bucketed columns keep pd.cut's rules, vectorised
                out[name] = _encode_cells(frame[name], vocab)
                continue
            codes, uniques = _factorize(frame[name], f)
            codes = codes.astype(np.int64)
            if not f.multi:
                idx = vocab.lookup(_prepare(pd.Series(uniques), f))
                out[name] = Column(np.where(codes >= 0, np.append(idx, UNKNOWN)[codes], UNKNOWN).astype(np.int32))
                continue
            tokens, token_cells = _unique_tokens(pd.Series(uniques), f)
            per_cell = np.bincount(token_cells, minlength=len(uniques)).astype(np.int64)
            # the distinct cells as bags, plus one extra bag [0] for missing cells; then gather rows from them
            values = np.append(vocab.lookup(tokens), np.int32(UNKNOWN))
            offsets = np.zeros(len(uniques) + 2, dtype=np.int64)
            np.cumsum(np.append(per_cell, 1), out=offsets[1:])
            cells = Column(values, offsets)
            out[name] = cells.take(np.where(codes >= 0, codes, len(uniques)))
        return out

    def to_dict(self) -> dict:
        """Plain JSON-able form: what a production export stores."""
        return {
            name: {
                "multi": v.feature.multi,
                "sep": v.feature.sep,
                "buckets": list(v.feature.buckets) if v.feature.buckets else None,
                "categories": v.categories,
                "counts": v.counts.tolist(),
            }
            for name, v in self.vocabs.items()
        }

    @classmethod
    def from_dict(cls, d: dict) -> Encoder:
        vocabs = {}
        for name, v in d.items():
            f = Feature(name, bool(v["multi"]), v["sep"], tuple(v["buckets"]) if v.get("buckets") else None)
            vocabs[name] = Vocabulary(f, list(v["categories"]), np.asarray(v["counts"], dtype=np.int64))
        return cls(vocabs)


def _factorize(values: pd.Series, f: Feature) -> tuple[np.ndarray, np.ndarray]:
    """``pd.factorize`` (NaN -> -1) that never gives a bool the code of a 1 or a 0, and reads list cells as ``joined``.

    Its hash table holds True == 1 and False == 0, so an object column's first seen of the two would spell both; they
    spell apart ("True" vs "1"). Only an object column holding both a bool and a value equal to 0 or 1 is factorized
    again, its bools on their own; the distinct values stay raw (bucketize reads a bool as a number, as before).
    Lists and arrays are unhashable, so factorize refuses them: only then is the column flattened cell by cell; a
    tuple (hashable) is found among the distinct values, which are scanned only when pandas' C type inference calls
    them mixed (a Python scan of a 1M-category column costs a fifth of its factorize).
    """
    try:
        codes, uniques = pd.factorize(values, use_na_sentinel=True)
        lists = values.dtype == object and pd.api.types.infer_dtype(uniques, skipna=True).startswith("mixed") \
            and any(isinstance(u, tuple) for u in uniques)
    except TypeError:  # unhashable cells: lists, arrays, dicts
        lists = True
    if lists:
        values = values.map(lambda cell: _flat(cell, f))
        codes, uniques = pd.factorize(values, use_na_sentinel=True)
    if values.dtype != object or not pd.Index(uniques).isin([0, 1]).any():
        return codes, uniques
    cells = values.to_numpy()
    is_bool = pd.Index(np.fromiter(map(type, cells), dtype=object, count=len(cells))).isin([bool, np.bool_])
    if not is_bool.any():
        return codes, uniques
    rest_codes, rest = pd.factorize(cells[~is_bool], use_na_sentinel=True)
    bool_codes, bools = pd.factorize(cells[is_bool], use_na_sentinel=True)
    codes = np.empty(len(cells), dtype=rest_codes.dtype)
    codes[~is_bool] = rest_codes
    codes[is_bool] = bool_codes + len(rest)
    uniques = np.empty(len(rest) + len(bools), dtype=object)
    uniques[: len(rest)], uniques[len(rest) :] = rest, bools
    return codes, uniques


def _prepare(values: pd.Series, f: Feature) -> pd.Series:
    return bucketize(values, f.buckets) if f.buckets else normalize(values)


def _cell_values(values: pd.Series, f: Feature) -> list[str | None]:
    """``normalize`` cell by cell: each cell's category string, None where it is missing; list cells ``joined``."""
    if pd.api.types.is_float_dtype(values):  # numpy scalars: str() spells float32 as pandas does ("0.1")
        return [None if v != v else _spell(v) for v in values.to_numpy()]
    out = []
    for v in values.tolist():
        v = _flat(v, f)
        spelled = None if _is_missing(v) else _spell(v)
        out.append(spelled or None)  # "" is missing too
    return out


def _encode_cells(values: pd.Series, vocab: Vocabulary) -> Column:
    """``Encoder.transform`` of one column, cell by cell (small frames; the vectorised path is in ``transform``)."""
    f = vocab.feature
    cells = _cell_values(values, f)
    if not f.multi:
        return Column(np.array([vocab.code(c) for c in cells], dtype=np.int32))
    bags = [[UNKNOWN] if c is None else [vocab.code(t.strip() or None) for t in c.split(f.sep)] for c in cells]
    offsets = np.zeros(len(bags) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in bags], out=offsets[1:])
    return Column(np.array([i for b in bags for i in b], dtype=np.int32), offsets)


def _unique_tokens(cells: pd.Series, f: Feature) -> tuple[pd.Series, np.ndarray]:
    """Tokens of distinct cells and, per token, the cell it came from; an empty/missing cell yields one NaN token."""
    prepared = _prepare(cells, f).reset_index(drop=True)
    if not f.multi:
        return prepared, np.arange(len(prepared), dtype=np.int64)
    flat = prepared.str.split(f.sep, regex=False).explode()
    owner = flat.index.to_numpy(dtype=np.int64)
    flat = flat.astype(object).str.strip()
    flat = flat.where(flat.notna() & (flat != ""), np.nan).reset_index(drop=True)
    return flat, owner
