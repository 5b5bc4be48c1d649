"""Read datasets into plain Python rows, fingerprint them, split them, store them.

Every loader returns `list[dict]` of plain Python values (no numpy/pandas scalars, NaN -> None),
so validation, hashing and JSON storage see the same thing whatever the source was. Errors are
`DataError`s that name the file (or hub id), the row or line and the field, because a message that
only says "invalid data" costs the user a bisection of their file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from pathlib import Path
from typing import Any

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")

# Columns that hold text: CSV cells there stay strings ("5" must not become the int 5, "NA" must
# not become a missing value), while other columns (label, margin) keep pandas' type inference.
_TEXT_COLUMNS = ("text", "prompt", "completion", "chosen", "rejected", "messages")


class DataError(ValueError):
    """Invalid or unreadable data; the message names the source, row (1-based) and field."""


# ------------------------------------------------------------------------------------ loading


def load_rows(
    path: str, *, split: str = "train", subset: str | None = None, revision: str | None = None
) -> list[dict]:
    """Load a local .jsonl/.json/.parquet/.csv file, or a Hugging Face hub dataset.

    Anything that is not an existing local file is treated as a hub id, except names that can
    only be meant as local paths (a known suffix, an absolute or ./ ../ ~ path, or more than one
    '/'): those fail with "file not found" instead of a confusing hub error. A hub id has at most
    one '/' ("owner/name"), which is why a single '/' alone does not make a name path-like.
    """
    p = Path(path).expanduser()
    if p.is_file():
        try:
            rows = _load_local(p)
        except UnicodeDecodeError as e:
            raise DataError(f"{p}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    elif p.is_dir():
        # A local folder of data files: datasets knows how to read those layouts.
        rows = _load_hub(str(p), split=split, subset=subset, revision=revision)
    elif _looks_like_path(path):
        raise DataError(f"{path}: file not found")
    else:
        rows = _load_hub(path, split=split, subset=subset, revision=revision)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def _looks_like_path(path: str) -> bool:
    return (
        Path(path).suffix.lower() in LOCAL_SUFFIXES
        or os.path.isabs(path)
        or path.startswith((".", "~"))
        or path.count("/") > 1
        or (os.sep != "/" and os.sep in path)
    )


def _load_local(p: Path) -> list[dict]:
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(p)
    if suffix == ".json":
        return _read_json(p)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(p).to_pylist()
        except Exception as e:  # pyarrow raises several unrelated types for bad files
            raise DataError(f"{p}: not a readable parquet file: {e}") from e
        return [_plain_row(r) for r in rows]
    if suffix == ".csv":
        return _read_csv(p)
    raise DataError(f"{p}: unsupported file type {suffix!r}; use one of {LOCAL_SUFFIXES}")


def _read_json(p: Path) -> list[dict]:
    """A JSON list of objects, an object {"data": [...]}, or JSON lines saved as .json."""
    text = p.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several top-level values: JSON lines under a .json name
            return read_jsonl(p)
        raise DataError(f"{p} line {e.lineno}: not valid JSON: {e.msg}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    elif isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError(f"{p}: expected a list of objects, got {type(data).__name__}")
    for i, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            raise DataError(f"{p} row {i}: expected a JSON object, got {type(row).__name__}")
    return data


def _read_csv(p: Path) -> list[dict]:
    import pandas as pd

    try:
        df = pd.read_csv(
            p,
            dtype={c: str for c in _TEXT_COLUMNS},
            keep_default_na=False,  # only empty cells are missing; "NA"/"null" stay text
            na_values=[""],
        )
    except Exception as e:  # pandas' parser errors share no useful base class
        raise DataError(f"{p}: not a readable CSV file: {e}") from e
    return [_plain_row(r) for r in df.to_dict("records")]


def _load_hub(
    path: str, *, split: str, subset: str | None, revision: str | None
) -> list[dict]:
    import datasets  # imported late: slow to import and only needed for hub data

    where = f"hub dataset {path!r} (subset={subset!r}, split={split!r}, revision={revision!r})"
    try:
        ds = datasets.load_dataset(path, subset, split=split, revision=revision)
    except Exception as e:  # network, auth, missing split...: re-raise with the full location
        raise DataError(f"could not load {where}: {type(e).__name__}: {e}") from e
    rows = ds.to_list() if hasattr(ds, "to_list") else list(ds)
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DataError(f"{where} row {i}: expected a mapping, got {type(row).__name__}")
    return [_plain_row(r) for r in rows]


def _plain_row(row: dict) -> dict:
    return {str(k): _plain(v) for k, v in row.items()}


def _plain(value: Any) -> Any:
    """numpy/pandas scalars and arrays -> Python values; NaN -> None (CSV's empty cells)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return _plain(value.tolist())  # numpy array or scalar (tolist on a scalar -> Python)
    if isinstance(value, float) and math.isnan(value):
        return None
    if value is not None and type(value).__name__ in ("NAType", "NaTType"):
        return None
    return value


# ---------------------------------------------------------------------------------- jsonl i/o


def read_jsonl(path: str | Path) -> list[dict]:
    """One JSON object per non-blank line; a bad line names the file and its 1-based line."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    rows = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p} line {lineno}: not valid JSON: {e.msg}") from None
            if not isinstance(row, dict):
                raise DataError(
                    f"{p} line {lineno}: expected a JSON object, got {type(row).__name__}"
                )
            rows.append(row)
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> None:
    """Write rows as JSON lines (UTF-8, non-ASCII kept), creating parent folders."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True))
            f.write("\n")


# ------------------------------------------------------------------------------- fingerprints


def fingerprint_file(path: str | Path) -> str:
    """sha256 of the file's bytes: the identity of local data, independent of its path."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint_rows(rows: list[dict]) -> str:
    """sha256 of a canonical JSON dump (sorted keys, one row per line).

    Used where there is no file to hash (hub data) and for prepared datasets, so that the same
    rows give the same fingerprint however they were read.
    """
    h = hashlib.sha256()
    for row in rows:
        line = json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        h.update(line.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


# ------------------------------------------------------------------------------------ splits


def split_rows(
    rows: list[dict], eval_fraction: float, seed: int
) -> tuple[list[dict], list[dict]]:
    """Hold out round(eval_fraction * n) rows, chosen by `random.Random(seed)`.

    With at least 2 rows both sides get at least one row (a tiny dataset must still evaluate).
    Each side keeps the rows' original order, so the split depends only on (n, fraction, seed).
    Fewer than 2 rows: everything is train and the eval side is empty.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    n = len(rows)
    if n < 2:
        return list(rows), []
    n_eval = min(max(1, round(eval_fraction * n)), n - 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    eval_idx = set(order[:n_eval])
    train = [r for i, r in enumerate(rows) if i not in eval_idx]
    held_out = [r for i, r in enumerate(rows) if i in eval_idx]
    return train, held_out
