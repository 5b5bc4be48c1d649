"""Refresh the deployment parameters in prefect.yaml from conf/demo.yaml.

prefect.yaml declares for work pools the same deployments `posttrain serve` builds; its
parameters are the demo config's values, copied here so the two never drift:
`python -m pipelines.prefect_yaml` (or `make prefect-yaml`) after editing conf/demo.yaml.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from posttrain.config import read_yaml

ROOT = Path(__file__).resolve().parents[1]


def refresh(prefect_yaml: Path = ROOT / "prefect.yaml", config: Path = ROOT / "conf/demo.yaml"):
    block = yaml.safe_dump({"cfg": read_yaml(config)}, sort_keys=False,
                           default_flow_style=None, width=100)
    block = "".join(f"    {line}\n" for line in block.splitlines())
    pattern = r"(  parameters: &demo_parameters\n)(.*?)(\ndeployments:)"
    text = prefect_yaml.read_text()
    new, count = re.subn(pattern, lambda m: m.group(1) + block + m.group(3), text, flags=re.DOTALL)
    if count != 1:
        raise SystemExit(f"{prefect_yaml}: no '  parameters: &demo_parameters' block found")
    prefect_yaml.write_text(new)


if __name__ == "__main__":
    refresh()
