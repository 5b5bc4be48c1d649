"""Content-addressed stage artifacts and their manifests.

A stage writes into `<root>/<stage>/<key>/`. The folder is first written under a temporary name
and renamed into place only when complete, so a crash never leaves a half-written artifact where a
reader would find it. `manifest.json` lists the sha256 of every file; its `digest` (a hash of that
list) is what downstream stages put into their own keys, so a change anywhere upstream changes the
key of everything below it and nothing above it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

from posttrain import disk

MANIFEST = "manifest.json"
KEY_LENGTH = 20  # hex characters of sha256 used for folder names: 80 bits, no collisions in practice
_KEY_LIBRARIES = ("torch", "transformers", "peft", "accelerate", "datasets", "tokenizers")


class ArtifactError(RuntimeError):
    """An artifact folder that is missing files or whose contents do not match its manifest."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_json(obj: Any) -> str:
    """sha256 of a canonical JSON rendering (sorted keys), the basis of every key."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@lru_cache(maxsize=1)
def code_version() -> str:
    """Hash of the library's own sources plus the versions of the libraries that shape results.

    Editing any file under posttrain/ invalidates every stage: cheap insurance against a cached
    artifact produced by code that no longer exists.
    """
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    for name in _KEY_LIBRARIES:
        try:
            h.update(f"{name}=={metadata.version(name)}".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{name}==absent".encode())
    return h.hexdigest()[:KEY_LENGTH]


def stage_key(
    stage: str,
    config: dict,
    upstream: dict[str, str] | None = None,
    data_fingerprint: str | None = None,
    code: str | None = None,
) -> str:
    """The cache key of one stage run.

    `upstream` maps an upstream stage name to its manifest digest; `data_fingerprint` hashes the
    dataset contents (never its path alone); `code` defaults to `code_version()`.
    """
    payload = {
        "stage": stage,
        "config": config,
        "upstream": upstream or {},
        "data": data_fingerprint,
        "code": code if code is not None else code_version(),
    }
    return hash_json(payload)[:KEY_LENGTH]


def stage_dir(root: str | Path, stage: str, key: str) -> Path:
    return Path(root) / stage / key


def _file_digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def verify(folder: str | Path, *, full: bool = True) -> dict:
    """Return the manifest of `folder` after checking its files; ArtifactError when they differ.

    `full=False` checks presence only (cheap enough for a cache-key function); `full=True` also
    re-hashes every file.
    """
    folder = Path(folder)
    mpath = folder / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{folder}: no {MANIFEST}")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{mpath}: unreadable manifest ({e})") from None
    for rel, digest in manifest.get("files", {}).items():
        path = folder / rel
        if not path.is_file():
            raise ArtifactError(f"{folder}: file {rel} listed in the manifest is missing")
        if full and sha256_file(path) != digest:
            raise ArtifactError(f"{folder}: file {rel} does not match its manifest digest")
    return manifest


def load_manifest(root: str | Path, stage: str, key: str, *, full: bool = True) -> dict | None:
    """The verified manifest of an existing artifact, or None when there is none.

    A folder that fails verification is moved aside (never deleted: nothing is lost) so that the
    stage can be produced again under the same key.
    """
    folder = stage_dir(root, stage, key)
    if not folder.exists():
        return None
    try:
        return verify(folder, full=full)
    except ArtifactError:
        aside = folder.with_name(f"{folder.name}.corrupt-{int(time.time())}")
        os.replace(folder, aside)
        return None


@dataclass
class StageOutput:
    """Handle given to a stage body: write files into `dir`, put JSON-able facts into `meta`."""

    dir: Path
    meta: dict = field(default_factory=dict)
    manifest: dict | None = None


@contextmanager
def write_stage(root: str | Path, stage: str, key: str,
                needed: Callable[[], int | None] | None = None) -> Iterator[StageOutput]:
    """Write a stage artifact atomically.

    Files go into a temporary sibling folder; on success the manifest is written last and the
    folder renamed to `<root>/<stage>/<key>`. On error the temporary folder is removed and the
    error propagates, so no reader ever sees a partial artifact. If another writer finished the
    same key first, its artifact is kept and ours discarded (the key says they are equivalent).
    The temporary folder's name records its writer (tmp_name); those of killed writers are
    removed here, a live concurrent writer's never. A full disk raises posttrain.disk's
    DiskFullError naming the folder, the bytes `needed()` says the artifact needs (else at least
    what was written) and the bytes free.
    """
    final = stage_dir(root, stage, key)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_tmp(final.parent)
    tmp = final.parent / tmp_name(key)
    tmp.mkdir()
    out = StageOutput(dir=tmp)
    try:
        yield out
        files = _file_digests(tmp)
        manifest = {
            "stage": stage,
            "key": key,
            "digest": hash_json({"stage": stage, "key": key, "files": files}),
            "files": files,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "path": str(final.resolve()),
            **out.meta,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / MANIFEST).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            manifest = verify(final, full=False)
        out.manifest = manifest
    except BaseException as e:
        if disk.is_disk_full(e):
            written = disk.folder_bytes(tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            size = (needed() if needed else None) or written
            raise disk.full_error(final.parent, f"the artifact of stage {stage}", size) from e
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------- owners of locks, runs, tmp
#
# What names a process across a crash: its host, PID and start time (a PID reused by a later
# process has another start time). A lock, an MLflow run or a temporary folder records its owner;
# whoever finds one whose owner is on this host and gone may take it over or clean it up.


def process_start_time(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, /proc/<pid>/stat field 22; psutil's
    create time in milliseconds where there is no /proc); None when there is no such process.
    A zombie (killed, not yet reaped) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        stat = None
    if stat is not None:
        fields = stat.rsplit(")", 1)[1].split()  # the command name may hold spaces and ')'
        if fields[0] in ("Z", "X"):  # field 3, the state: zombie or dead
            return None
        return int(fields[19])  # field 22
    try:
        import psutil
    except ImportError:
        return None if not _pid_exists(pid) else -1  # -1: alive, start time unknown
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return int(proc.create_time() * 1000)
    except psutil.Error:
        return None


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid_namespace() -> str:
    """This process's PID namespace ('' where there is none to read): two containers with one
    host name (docker --network host) number their processes apart."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def current_owner() -> dict:
    """This process as an owner: {"host", "pid", "start_time", "pid_namespace"}."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start_time": process_start_time(pid),
            "pid_namespace": _pid_namespace()}


def owner_alive(owner: dict) -> bool | None:
    """Whether `owner` (as current_owner() wrote it) still runs: True or False on this host,
    None on another host or in another PID namespace (nothing here can tell)."""
    if owner.get("host") != socket.gethostname():
        return None
    if owner.get("pid_namespace") and owner["pid_namespace"] != _pid_namespace():
        return None
    try:
        pid = int(owner["pid"])
    except (KeyError, TypeError, ValueError):
        return None
    started = process_start_time(pid)
    if started is None:
        return False
    recorded = owner.get("start_time")
    if recorded in (None, "", "None") or started == -1:
        return True  # the PID runs and nothing says it is another process
    return int(recorded) == started


def _host_tag(host: str) -> str:
    """A short name of the host and PID namespace, safe in a folder name."""
    return hashlib.sha256(f"{host} {_pid_namespace()}".encode()).hexdigest()[:8]


def tmp_name(prefix: str) -> str:
    """A temporary folder's name, `.tmp-<prefix>-<random>.<host>.<pid>.<start time>`: it says
    who writes it, so that a later run removes it only when that writer is gone."""
    me = current_owner()
    return (f".tmp-{prefix}-{uuid.uuid4().hex[:8]}.{_host_tag(me['host'])}.{me['pid']}."
            f"{me['start_time']}")


def tmp_writer_gone(name: str) -> bool:
    """Whether the writer of temporary folder `name` (a tmp_name()) is known to be gone: on this
    host and not running. Folders of another host, or without an owner in their name, stay."""
    parts = name.rsplit(".", 3)
    if len(parts) != 4 or parts[1] != _host_tag(socket.gethostname()):
        return False
    try:
        pid = int(parts[2])
    except ValueError:
        return False
    owner = {"host": socket.gethostname(), "pid": pid, "start_time": parts[3]}
    return owner_alive(owner) is False


def remove_dead_tmp(folder: str | Path) -> list[Path]:
    """Remove the `.tmp-*` folders under `folder` (not below) whose writer is gone (a run killed
    while writing); a live writer's folder is never touched. Returns the folders removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.glob(".tmp-*"):
        if path.is_dir() and tmp_writer_gone(path.name):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def remove_own_tmp(root: str | Path) -> list[Path]:
    """Remove the `.tmp-*` folders this process was writing one level below `root` (each
    stage's folder): what an interrupted command does before it exits."""
    me = current_owner()
    mine = f".{_host_tag(me['host'])}.{me['pid']}.{me['start_time']}"
    removed = []
    for path in Path(root).glob("*/.tmp-*"):
        if path.is_dir() and path.name.endswith(mine):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
