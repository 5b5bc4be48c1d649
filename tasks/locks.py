"""Stage locks that name their owner, so that a crash never leaves a stage locked for good.

Prefect's FileSystemLockManager writes `{"holder": <transaction id>, "expiration": null}`: after
a `kill -9` nothing ever releases it and the next run waits forever. OwnedLockManager also writes
the owner process (host, PID, process start time). Whoever finds a lock whose owner is on this
host and no longer runs (no such PID, or the PID now belongs to a process started at another
time) takes it over, saying so; a live owner's lock is waited on as before, so two live runs
still train a stage once. An owner on another host cannot be checked: the lock is waited on and
the log says for whom.

Lock files are created whole (written aside, then hard-linked into place), so a reader never sees
an empty one; a takeover happens under an flock so that two runs never both take over one lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from pathlib import Path

import pydantic_core
from prefect.locking.filesystem import FileSystemLockManager
from prefect.logging import get_logger
from prefect.types._datetime import now

from posttrain import artifacts

_log = get_logger("posttrain.locks")


def _logger():
    """The task run's logger (its lines reach the console and the Prefect UI), else ours."""
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # noqa: BLE001 - outside a run: no run logger
        return _log


class OwnedLockManager(FileSystemLockManager):
    """A FileSystemLockManager whose locks record their owner process and are taken over when
    it is gone. `stage` names the stage in messages."""

    def __init__(self, lock_files_directory: Path, stage: str = "") -> None:
        super().__init__(Path(lock_files_directory))
        self.stage = stage
        self._announced: set[tuple[str, str]] = set()

    # ------------------------------------------------------------------ acquiring, atomically

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                     hold_timeout: float | None = None) -> bool:
        self._ensure_lock_files_directory_exists()
        deadline = None if acquire_timeout is None else time.monotonic() + acquire_timeout
        while True:
            if self.is_lock_holder(key, holder):
                return True
            if self._create(key, holder, hold_timeout):
                return True
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            if not self.wait_for_lock(key, remaining):
                return False

    async def aacquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                            hold_timeout: float | None = None) -> bool:
        import anyio

        return await anyio.to_thread.run_sync(
            lambda: self.acquire_lock(key, holder, acquire_timeout, hold_timeout))

    def _create(self, key: str, holder: str, hold_timeout: float | None) -> bool:
        """Create the lock file with its contents in one step; False if it exists."""
        path = self._lock_path_for_key(key)
        expiration = None if hold_timeout is None else now("UTC") + _seconds(hold_timeout)
        info = {"holder": holder, "expiration": None if expiration is None else str(expiration),
                "owner": artifacts.current_owner()}
        aside = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
        aside.write_bytes(pydantic_core.to_json(info))
        try:
            os.link(aside, path)
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: create exclusively, then write
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(pydantic_core.to_json(info))
        finally:
            aside.unlink(missing_ok=True)
        self._locks[key] = {"holder": holder, "expiration": expiration, "path": path,
                            "owner": info["owner"]}
        return True

    # ------------------------------------------------------------------ stale locks

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        try:
            locked = super().is_locked(key, use_cache=use_cache)
        except FileNotFoundError:  # an expired lock someone else removed first
            self._locks.pop(key, None)
            return False
        except ValueError:  # a lock file being written by a run without hard links
            return True
        if not locked:
            return False
        info = self._locks.get(key) or {}
        owner = info.get("owner")
        stale = bool(owner) and artifacts.owner_alive(owner) is False
        return not (stale and self._take_over(key, info))

    def _take_over(self, key: str, stale: dict) -> bool:
        """Remove the lock `stale` (whose owner is gone) unless someone replaced it meanwhile."""
        path = self._lock_path_for_key(key)
        with _flock(self.lock_files_directory / ".takeover"):
            try:
                current = json.loads(path.read_bytes())
            except FileNotFoundError:
                self._locks.pop(key, None)
                return True
            except ValueError:
                return False
            if current.get("holder") != stale.get("holder"):
                self._locks.pop(key, None)
                return False  # a new lock: the next look decides about it
            owner = current.get("owner") or {}
            if artifacts.owner_alive(owner) is not False:
                return False
            path.unlink(missing_ok=True)
        self._locks.pop(key, None)
        _logger().warning(
            "taking over the lock of stage %s left by PID %s on %s, which is no longer running",
            self.stage or key, owner.get("pid"), owner.get("host"))
        return True

    # ------------------------------------------------------------------ waiting, saying for whom

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        self._announce_wait(key)
        return super().wait_for_lock(key, timeout)

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        self._announce_wait(key)
        return await super().await_for_lock(key, timeout)

    def _announce_wait(self, key: str) -> None:
        """One line per lock waited on: who holds it, and whether that can be checked."""
        if not self.is_locked(key):
            return
        info = self._locks.get(key) or {}
        mark = (key, str(info.get("holder")))
        if mark in self._announced:
            return
        self._announced.add(mark)
        owner = info.get("owner")
        stage = self.stage or key
        path = self._lock_path_for_key(key)
        if not owner:
            _logger().warning("waiting for the lock of stage %s (%s), which names no owner; if no "
                              "posttrain run is using this artifacts root, delete it",
                              stage, path)
        elif artifacts.owner_alive(owner) is None:
            _logger().warning("waiting for the lock of stage %s held by PID %s on %s, another "
                              "host or container (it cannot be checked from here; if that run "
                              "is gone, delete %s)", stage, owner.get("pid"), owner.get("host"),
                              path)
        else:
            _logger().info("waiting for stage %s: PID %s on %s is running it",
                           stage, owner.get("pid"), owner.get("host"))


def release_owned(lock_files_directory: Path) -> list[Path]:
    """Delete the lock files this process holds (what an interrupted command does before it
    exits, so that a rerun need not find out that their owner is gone)."""
    me = artifacts.current_owner()
    released = []
    for path in Path(lock_files_directory).glob("*.lock"):
        try:
            owner = json.loads(path.read_bytes()).get("owner") or {}
        except (OSError, ValueError):
            continue
        if all(owner.get(k) == me[k] for k in ("host", "pid", "start_time")):
            path.unlink(missing_ok=True)
            released.append(path)
    return released


def _seconds(value: float):
    from datetime import timedelta

    return timedelta(seconds=value)


@contextlib.contextmanager
def _flock(path: Path):
    """An exclusive flock on `path` (released by the kernel if this process dies)."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): takeovers are not serialized
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
