"""posttrain: post-training for language models (SFT, reward models, preference optimization, RL).

The library never imports Prefect; `tasks/` and `pipelines/` wrap it into cached, tracked flows.
"""

__version__ = "0.1.0"
