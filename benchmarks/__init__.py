"""Speed and memory benchmarks of posttrain (see benchmarks/README.md).

`python -m benchmarks.run` spawns one `python -m benchmarks.worker` process per variant, so that
peak memory is per variant, and reports side-by-side ratios measured in the same run.
"""
