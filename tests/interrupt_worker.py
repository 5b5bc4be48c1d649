"""One process of tests/test_crash.py's two-process stop test: a toy DDP loop (gloo on CPU)
whose steps all-reduce gradients, with posttrain.checkpoints.after_step at every step boundary;
only rank `--signalled-rank` gets SIGTERM, during step 3. Writes what each process did to
OUT/rank<R>.json.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/interrupt_worker.py \\
        OUT CHECKPOINTS
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch

from posttrain import checkpoints, interrupt
from posttrain.training import end_distributed, make_accelerator


def main(out: Path, ckpt: Path, signalled_rank: int = 1) -> None:
    accelerator = make_accelerator("no")
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    rank = accelerator.process_index
    done: list[int] = []
    result = {"rank": rank, "stopped_by": None}
    try:
        with interrupt.stage("toy"):
            for step in range(1, 40):
                if step == 3 and rank == signalled_rank:
                    os.kill(os.getpid(), signal.SIGTERM)  # handled before this step ends
                loss = model(torch.ones(2, 4, device=accelerator.device)).pow(2).sum()
                accelerator.backward(loss)  # DDP: an all-reduce every step
                optimizer.step()
                optimizer.zero_grad()
                done.append(step)
                checkpoints.after_step(accelerator, ckpt, step, every=100, keep=2)
    except interrupt.Interrupted as e:
        result["stopped_by"] = e.signal_name
        result["message"] = str(e)
    result["steps"] = done
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    end_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
