"""A new SQLite MLflow store, started from an empty one already migrated.

MLflow creates a SQLite store's tables by running its schema migrations one by one (about 60 of
them in MLflow 3.17), which takes 0.7-2 s of CPU whenever a command meets a store file that does
not exist yet: every first run in a new folder (`sqlite:///mlflow.db` is the default), and most
test commands. The result of those migrations is the same for every store of one MLflow version,
before MLflow adds the store's own rows (the Default experiment, whose artifact location is the
store's folder). So the first time, the migrations run once more into a template under the
user's cache folder (`$XDG_CACHE_HOME/posttrain` or `~/.cache/posttrain`, one file per MLflow
version), and a new store file starts as a copy of it; MLflow then opens it as it opens any
store (it checks the schema version, then creates the Default experiment).

Only a store file that does not exist, in a folder that does, is seeded: anything else (an
existing store, a missing folder, a server URI) is left to MLflow, errors included. A template
that cannot be made or copied leaves the store to MLflow too, which then migrates it itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)
_SQLITE = "sqlite:///"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "posttrain"


def template_path() -> Path:
    import mlflow

    return cache_dir() / f"mlflow-{mlflow.__version__}-empty-store.db"


def seed_new_sqlite_store(uri: str) -> str:
    """Copy the migrated empty template to the file of a new SQLite store `uri`; returns `uri`."""
    if not uri.startswith(_SQLITE) or "?" in uri or uri == f"{_SQLITE}:memory:":
        return uri
    path = Path(uri.removeprefix(_SQLITE))
    if path.exists() or not path.parent.is_dir():
        return uri
    try:
        template = template_path()
        if not template.exists():
            _make_template(template)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        shutil.copyfile(template, partial)
        try:
            os.link(partial, path)  # never replaces a store another process created meanwhile
        except FileExistsError:
            pass
        finally:
            partial.unlink()
    except Exception as e:  # noqa: BLE001 - MLflow then creates the store itself, as without this
        log.debug("no MLflow store template (%s); MLflow migrates %s itself", e, path)
    return uri


def _make_template(template: Path) -> None:
    """Run MLflow's own table creation and migrations into `template`, atomically."""
    import sqlalchemy
    from mlflow.store.db.utils import _initialize_tables

    template.parent.mkdir(parents=True, exist_ok=True)
    partial = template.with_name(f".{template.name}.{os.getpid()}.partial")
    engine = sqlalchemy.create_engine(f"{_SQLITE}{partial}")
    try:
        _initialize_tables(engine)
    finally:
        engine.dispose()
    try:
        os.replace(partial, template)
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
