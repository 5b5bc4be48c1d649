"""A new SQLite MLflow store starts as a copy of a migrated empty one (posttrain/mlflow_store.py):
the same store MLflow makes itself, without running the migrations for each new file."""

from __future__ import annotations

import sqlite3

import pytest

from posttrain import mlflow_store, tracking


@pytest.fixture
def migrations(monkeypatch, tmp_path):
    """Counts MLflow's table creations (each runs every schema migration); an empty cache."""
    import mlflow.store.db.utils as db_utils

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    calls = []
    real = db_utils._initialize_tables
    monkeypatch.setattr(db_utils, "_initialize_tables",
                        lambda engine: calls.append(str(engine.url)) or real(engine))
    return calls


_CONSTRAINT = ("CONSTRAINT", "CHECK", "FOREIGN KEY", "UNIQUE", "PRIMARY KEY")


def _statement(sql: str | None) -> tuple:
    """A CREATE statement with its columns in order and its constraints as a set: MLflow's own
    migrations list a table's constraints in an order that varies from one process to another."""
    lines = [line.strip().rstrip(",").strip() for line in (sql or "").splitlines()]
    return (tuple(line for line in lines if not line.startswith(_CONSTRAINT)),
            frozenset(line for line in lines if line.startswith(_CONSTRAINT)))


def _contents(path) -> dict:
    """The schema, the schema version and the experiments of a store file."""
    with sqlite3.connect(path) as db:
        return {
            "schema": sorted((kind, name, _statement(sql)) for kind, name, sql in
                             db.execute("SELECT type, name, sql FROM sqlite_master")),
            "version": db.execute("SELECT version_num FROM alembic_version").fetchall(),
            "experiments": db.execute("SELECT experiment_id, name, artifact_location, "
                                      "lifecycle_stage FROM experiments").fetchall(),
        }


def _open(monkeypatch, folder, name: str = "mlflow.db"):
    """A store opened and used as a command does, in `folder` (its working directory)."""
    folder.mkdir(exist_ok=True)
    monkeypatch.chdir(folder)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / name}")
    tracking.experiment_id("seeded")
    return folder / name


def test_a_seeded_store_is_the_store_mlflow_makes_and_skips_the_migrations(
        migrations, monkeypatch, tmp_path):
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    first = _open(monkeypatch, tmp_path / "first")  # no template yet: made once, then copied
    assert len(migrations) == 1 and mlflow_store.template_path().exists()
    second = _open(monkeypatch, tmp_path / "second")
    assert len(migrations) == 1, "a new store was migrated again instead of copied"
    # What MLflow makes by itself, in the same folder layout.
    (tmp_path / "plain").mkdir()
    monkeypatch.chdir(tmp_path / "plain")
    SqlAlchemyStore(f"sqlite:///{tmp_path / 'plain' / 'mlflow.db'}", "./mlruns")
    assert len(migrations) == 2
    plain = _contents(tmp_path / "plain" / "mlflow.db")
    for seeded in (first, second):
        got = _contents(seeded)
        assert got["schema"] == plain["schema"] and got["version"] == plain["version"]
        default = [e for e in got["experiments"] if e[1] == "Default"]
        assert [e[3] for e in default] == ["active"]
        assert default[0][2] == plain["experiments"][0][2].replace("plain", seeded.parent.name)


def test_only_a_store_file_that_does_not_exist_in_a_folder_that_does_is_seeded(
        migrations, tmp_path):
    existing = tmp_path / "existing.db"
    existing.write_bytes(b"not a database")
    for uri in (f"sqlite:///{existing}", f"sqlite:///{tmp_path / 'missing' / 'mlflow.db'}",
                "http://127.0.0.1:5000", f"sqlite:///{tmp_path / 'ro.db'}?mode=ro"):
        assert mlflow_store.seed_new_sqlite_store(uri) == uri
    assert existing.read_bytes() == b"not a database"
    assert not (tmp_path / "missing").exists() and not (tmp_path / "ro.db").exists()
    assert migrations == [] and not mlflow_store.template_path().exists()
    new = tmp_path / "new.db"
    mlflow_store.seed_new_sqlite_store(f"sqlite:///{new}")
    assert new.read_bytes() == mlflow_store.template_path().read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "existing.db", "new.db"]
