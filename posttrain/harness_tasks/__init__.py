"""lm-evaluation-harness tasks shipped with posttrain (YAML + JSONL, package data).

`posttrain_demo`: the demo's 200 held-out prompts of conf/demo.yaml (demo seed 0, conversational),
generated until EOS and scored by exact match against the checker's answer. Regenerate with
`python -m posttrain.harness_tasks` after changing the demo generator.
"""
