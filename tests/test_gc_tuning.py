"""The process entry points tune Python's garbage collector (posttrain/gc_tuning.py): rare full
collections, and the heap frozen at exit, after the libraries' own exit hooks have run. Each
check runs the entry point in a process of its own, as a user's command does, and reads the
collector's state from an exit hook registered before the entry point (exit hooks run last
registered first, so it runs after everything the command registered)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from posttrain.gc_tuning import FULL_COLLECTION_THRESHOLD
from posttrain.launch import ERROR_PREFIX

ROOT = Path(__file__).resolve().parents[1]
PROBE = ("import atexit, gc, sys\n"
         "atexit.register(lambda: print('gc at exit:', gc.get_freeze_count() > 0,"
         " gc.get_threshold()[2], gc.get_threshold()[:2] == (700, 10), flush=True))\n")


def _probe(code: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-c", PROBE + code, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("gc at exit:")]
    assert lines, done.stdout + done.stderr
    return lines[-1]


def test_the_posttrain_command_makes_full_collections_rare_and_freezes_the_heap_at_exit():
    line = _probe("sys.argv = ['posttrain', '--help']\nfrom pipelines import cli\ncli.main()")
    assert line == f"gc at exit: True {FULL_COLLECTION_THRESHOLD} True"


def test_a_launched_stage_process_tunes_the_collector_too(tmp_path):
    # No config in the work folder: the process fails after the entry point has run.
    line = _probe("from posttrain import launch\nlaunch.main(sys.argv[1:])",
                  "--stage", "sft", "--workdir", str(tmp_path))
    assert line == f"gc at exit: True {FULL_COLLECTION_THRESHOLD} True"
    assert (tmp_path / f"{ERROR_PREFIX}0.json").exists()


def test_a_plain_python_process_keeps_the_defaults():
    """The probe itself reads the defaults when nothing tunes the collector."""
    assert _probe("import pipelines.cli") == "gc at exit: False 10 True"
