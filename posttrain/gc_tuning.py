"""Python's garbage collector, tuned for a command that imports the ML stack and then trains.

A `posttrain` command imports torch, transformers, MLflow and Prefect: about half a million
objects that live as long as the process. CPython 3.11's full (generation 2) collections re-scan
all of them and find no garbage there; measured on a 15-step DPO command here, 9 full
collections took 2.0 s and the last collection at interpreter exit another 2.6 s, a quarter of
the command's wall time (benchmarks/RESULTS.md, section 9). Cyclic garbage of the training loop
is still collected by the young generations, which keep their default thresholds.
"""

from __future__ import annotations

import atexit
import gc

# Full collections after this many generation-1 collections (CPython's default: 10).
FULL_COLLECTION_THRESHOLD = 1000


def tune_for_a_command() -> None:
    """Rare full collections, and none over the whole heap at exit (the operating system frees
    it). Called first by each process entry point (`posttrain`, the launched stage processes,
    and tests/conftest.py for the test processes); the atexit hook is registered here, before
    the libraries' own, so it runs after theirs. A command that ends with os._exit (a stop by
    signal, pipelines/stop.py) skips exit hooks and the final collection anyway."""
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_THRESHOLD)
    atexit.register(gc.freeze)
