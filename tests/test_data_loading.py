"""Loading local files and hub ids, fingerprints, train/eval splits."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from posttrain.data import loading
from posttrain.data.loading import (
    DataError,
    fingerprint_file,
    fingerprint_rows,
    load_rows,
    read_jsonl,
    split_rows,
    write_jsonl,
)

ROWS = [
    {"prompt": "2+3=", "completion": "5", "label": True},
    {"prompt": "ab", "completion": "NA", "label": False},
    {"prompt": "héllo", "completion": "x y", "label": True},
]
CHAT_ROWS = [
    {
        "prompt": [{"role": "user", "content": "hi"}],
        "completion": [{"role": "assistant", "content": "yo"}],
    },
    {
        "prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
        "completion": [{"role": "assistant", "content": "a"}],
    },
]


def _assert_plain(rows: list[dict]) -> None:
    """Only Python builtins: numpy/pandas scalars would break JSON dumps and `type(x) is bool`."""
    for row in rows:
        for v in row.values():
            assert type(v) in (str, bool, int, float, list, dict, type(None)), type(v)


def test_jsonl_round_trip(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    write_jsonl(ROWS + CHAT_ROWS, p)
    assert read_jsonl(p) == ROWS + CHAT_ROWS
    assert load_rows(str(p)) == ROWS + CHAT_ROWS


def test_jsonl_skips_blank_lines(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a"}\n\n   \n{"text": "b"}\n')
    assert load_rows(str(p)) == [{"text": "a"}, {"text": "b"}]


def test_json_list_dict_and_lines(tmp_path: Path) -> None:
    as_list, as_data, as_lines = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    as_list.write_text(json.dumps(ROWS))
    as_data.write_text(json.dumps({"data": ROWS}))
    as_lines.write_text("\n".join(json.dumps(r) for r in ROWS))
    for p in (as_list, as_data, as_lines):
        assert load_rows(str(p)) == ROWS, p.name


def test_parquet_round_trip_with_messages(tmp_path: Path) -> None:
    p = tmp_path / "d.parquet"
    pd.DataFrame(CHAT_ROWS).to_parquet(p)
    rows = load_rows(str(p))
    assert rows == CHAT_ROWS
    assert type(rows[0]["prompt"]) is list and type(rows[0]["prompt"][0]) is dict
    p2 = tmp_path / "e.parquet"
    pd.DataFrame(ROWS).to_parquet(p2)
    rows2 = load_rows(str(p2))
    assert rows2 == ROWS
    _assert_plain(rows2)


def test_csv_keeps_text_as_strings_and_empty_cells_as_none(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    df = pd.DataFrame(ROWS + [{"prompt": "q", "completion": None, "label": True}])
    df["margin"] = [0.5, 1.0, 2.0, None]
    df.to_csv(p, index=False)
    rows = load_rows(str(p))
    # "5" stays a string and "NA" stays text; the label column is bool; the empty cell is None.
    assert rows[0] == {"prompt": "2+3=", "completion": "5", "label": True, "margin": 0.5}
    assert rows[1]["completion"] == "NA"
    assert rows[3]["completion"] is None and rows[3]["margin"] is None
    _assert_plain(rows)


def test_bad_jsonl_line_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "train.jsonl"
    p.write_text('{"text": "a"}\n{"text": "b"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"train\.jsonl line 3: not valid JSON"):
        load_rows(str(p))
    p.write_text('{"text": "a"}\n["not", "an", "object"]\n')
    with pytest.raises(DataError, match=r"train\.jsonl line 2: expected a JSON object, got list"):
        load_rows(str(p))


def test_bad_json_array_item_names_row(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"text": "a"}, 3]))
    with pytest.raises(DataError, match=r"d\.json row 2: expected a JSON object, got int"):
        load_rows(str(p))


@pytest.mark.parametrize("name", ["missing.jsonl", "sub/dir/data", "./data", "/nonexistent/x"])
def test_missing_path_like_file(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def no_hub(*args, **kwargs):
        raise AssertionError("a path-like name must not reach the hub")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    with pytest.raises(DataError, match="file not found"):
        load_rows(name)


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    p = tmp_path / "empty.jsonl"
    p.write_text("\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: no rows"):
        load_rows(str(p))


def test_hub_id_goes_through_load_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets
    import numpy as np

    calls = []

    def fake_load_dataset(path, name=None, *, split=None, revision=None):
        calls.append((path, name, split, revision))
        return datasets.Dataset.from_dict({"text": ["a", "b"], "n": np.array([1, 2])})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows = load_rows("owner/name", split="test", subset="cfg", revision="abc123")
    assert calls == [("owner/name", "cfg", "test", "abc123")]
    assert rows == [{"text": "a", "n": 1}, {"text": "b", "n": 2}]
    _assert_plain(rows)


def test_hub_failure_names_the_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def failing(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(DataError, match=r"'owner/name'.*split='train'.*ConnectionError: offline"):
        load_rows("owner/name")


def test_plain_converts_numpy_and_nan() -> None:
    import numpy as np

    got = loading._plain({"a": np.int64(3), "b": np.array([1.5, np.nan]), "c": float("nan")})
    assert got == {"a": 3, "b": [1.5, None], "c": None}
    assert type(got["a"]) is int


def test_fingerprint_file_depends_on_bytes_only(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_jsonl(ROWS, a)
    write_jsonl(ROWS, b)
    assert fingerprint_file(a) == fingerprint_file(b)  # same bytes, different path
    assert len(fingerprint_file(a)) == 64
    write_jsonl([*ROWS[:2], {**ROWS[2], "completion": "x z"}], b)
    assert fingerprint_file(a) != fingerprint_file(b)


def test_fingerprint_rows() -> None:
    same = [dict(reversed(list(r.items()))) for r in ROWS]  # key order does not matter
    assert fingerprint_rows(ROWS) == fingerprint_rows(same)
    changed = [*ROWS[:2], {**ROWS[2], "label": False}]
    assert fingerprint_rows(ROWS) != fingerprint_rows(changed)
    assert fingerprint_rows(ROWS) != fingerprint_rows(list(reversed(ROWS)))  # order matters
    assert fingerprint_rows(ROWS) != fingerprint_rows(ROWS[:2])


def test_split_is_deterministic_disjoint_and_complete() -> None:
    rows = [{"i": i} for i in range(100)]
    train, held = split_rows(rows, 0.1, seed=3)
    assert len(held) == 10 and len(train) == 90
    assert sorted(r["i"] for r in train + held) == list(range(100))
    assert split_rows(rows, 0.1, seed=3) == (train, held)
    assert split_rows(rows, 0.1, seed=4)[1] != held
    # each side keeps file order
    assert [r["i"] for r in held] == sorted(r["i"] for r in held)


@pytest.mark.parametrize(("n", "fraction", "n_eval"), [(2, 0.01, 1), (2, 0.99, 1), (3, 0.5, 2)])
def test_split_keeps_one_row_each_side(n: int, fraction: float, n_eval: int) -> None:
    """n=3, 0.5 -> round(1.5) = 2 (banker's rounding) eval rows, 1 train row."""
    train, held = split_rows([{"i": i} for i in range(n)], fraction, seed=0)
    assert len(held) == n_eval and len(train) == n - n_eval


def test_split_of_one_row_is_all_train() -> None:
    assert split_rows([{"i": 0}], 0.5, seed=0) == ([{"i": 0}], [])
