"""Content-addressed artifacts: atomic writes, digests, keys that move only when they should."""

from __future__ import annotations

import json

import pytest

from posttrain import artifacts as A


def test_write_stage_renames_complete_folder_with_manifest(tmp_path):
    with A.write_stage(tmp_path, "sft", "k1") as out:
        (out.dir / "weights.bin").write_bytes(b"abc")
        (out.dir / "sub").mkdir()
        (out.dir / "sub" / "x.txt").write_text("x")
        out.meta["metrics"] = {"loss": 1.5}
    folder = tmp_path / "sft" / "k1"
    manifest = json.loads((folder / "manifest.json").read_text())
    # sha256("abc") is the well-known test vector.
    assert manifest["files"]["weights.bin"] == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    assert set(manifest["files"]) == {"weights.bin", "sub/x.txt"}
    assert manifest["metrics"] == {"loss": 1.5}
    assert out.manifest["digest"] == manifest["digest"]
    assert [p.name for p in (tmp_path / "sft").iterdir()] == ["k1"]  # no temp folder left


def test_failed_stage_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), A.write_stage(tmp_path, "sft", "k1") as out:
        (out.dir / "half.bin").write_bytes(b"partial")
        raise RuntimeError("boom")
    assert list((tmp_path / "sft").iterdir()) == []
    assert A.load_manifest(tmp_path, "sft", "k1") is None


def _make(tmp_path, key="k1", content=b"abc"):
    with A.write_stage(tmp_path, "data", key) as out:
        (out.dir / "rows.jsonl").write_bytes(content)
    return out.manifest


def test_digest_depends_on_content_only(tmp_path):
    a = _make(tmp_path / "a")
    b = _make(tmp_path / "b")
    c = _make(tmp_path / "c", content=b"abd")
    assert a["digest"] == b["digest"] != c["digest"]


def test_tampered_artifact_is_refused_and_moved_aside(tmp_path):
    _make(tmp_path)
    folder = tmp_path / "data" / "k1"
    (folder / "rows.jsonl").write_bytes(b"tampered")
    with pytest.raises(A.ArtifactError, match="does not match"):
        A.verify(folder)
    assert A.load_manifest(tmp_path, "data", "k1") is None
    moved = [p.name for p in (tmp_path / "data").iterdir()]
    assert len(moved) == 1 and moved[0].startswith("k1.corrupt-")  # kept, not deleted


def test_missing_file_is_detected_by_cheap_check(tmp_path):
    _make(tmp_path)
    (tmp_path / "data" / "k1" / "rows.jsonl").unlink()
    with pytest.raises(A.ArtifactError, match="missing"):
        A.verify(tmp_path / "data" / "k1", full=False)


def test_stage_key_moves_with_each_ingredient():
    base = {"stage": "sft", "config": {"lr": 1.0}, "upstream": {"data": "d1"},
            "data_fingerprint": "f", "code": "c"}
    k = A.stage_key(**base)
    assert A.stage_key(**base) == k
    assert A.stage_key(**{**base, "config": {"lr": 2.0}}) != k
    assert A.stage_key(**{**base, "upstream": {"data": "d2"}}) != k
    assert A.stage_key(**{**base, "data_fingerprint": "g"}) != k
    assert A.stage_key(**{**base, "code": "c2"}) != k
    assert A.stage_key(**{**base, "stage": "dpo"}) != k
    # Key order inside the config is irrelevant (canonical JSON).
    assert A.stage_key(**{**base, "config": {"b": 1, "a": 2}}) == A.stage_key(
        **{**base, "config": {"a": 2, "b": 1}}
    )


def test_code_version_is_stable_and_short():
    assert A.code_version() == A.code_version()
    assert len(A.code_version()) == A.KEY_LENGTH
