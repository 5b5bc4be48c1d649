"""One process of tests/test_crash.py's two-process stop test: a toy DDP loop (gloo on CPU)
whose steps all-reduce gradients, with posttrain.checkpoints.after_step at every step boundary;
only rank `--signalled-rank` gets SIGTERM, during step 3. Writes what each process did to
OUT/rank<R>.json.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/interrupt_worker.py \\
        OUT CHECKPOINTS [generators | slow]

With `generators`: each process's checkpointed sampling generator comes back as its own. With
`slow`: both processes get SIGTERM during step 3, rank 1 first, and rank 1's step 3 outlasts the
grace period (posttrain.interrupt.GRACE_SECONDS), so that rank 1 is stopped where it is while
rank 0 waits for it in the step's gradient all-reduce.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

from posttrain import checkpoints, interrupt
from posttrain.training import end_distributed, make_accelerator


def main(out: Path, ckpt: Path, signalled_rank: int = 1, slow: bool = False) -> None:
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
                if step == 3 and slow:
                    if rank == 0:
                        time.sleep(interrupt.GRACE_SECONDS / 2 + 0.5)
                    os.kill(os.getpid(), signal.SIGTERM)
                    if rank == 1:
                        time.sleep(3 * interrupt.GRACE_SECONDS)  # cut short by the grace stop
                elif step == 3 and rank == signalled_rank:
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
    if slow:  # as a launched process that stopped: exit, no collective teardown with the peer
        os._exit(0)
    end_distributed()


def generators(out: Path, ckpt: Path) -> None:
    """Each process's sampling generator, drawn from a different number of times (rollouts end
    at EOS at different lengths), checkpointed and restored: OUT/gen<R>.json holds the draws
    after the checkpoint and the draws after restoring it into a fresh generator."""
    accelerator = make_accelerator("no")
    rank = accelerator.process_index
    generator = torch.Generator().manual_seed(0)  # the same seed everywhere, as the recipes do
    accelerator.register_for_checkpointing(checkpoints.GeneratorState(generator))
    torch.rand(rank + 1, generator=generator)
    checkpoints.save(accelerator, ckpt, 1, keep=2)
    expected = torch.rand(3, generator=generator).tolist()
    generator.manual_seed(123)
    assert checkpoints.restore(accelerator, ckpt) == 1
    got = torch.rand(3, generator=generator).tolist()
    (out / f"gen{rank}.json").write_text(json.dumps({"expected": expected, "got": got}))
    end_distributed()


if __name__ == "__main__":
    if sys.argv[3:] == ["generators"]:
        generators(Path(sys.argv[1]), Path(sys.argv[2]))
    elif sys.argv[3:] == ["slow"]:
        main(Path(sys.argv[1]), Path(sys.argv[2]), slow=True)
    else:
        main(Path(sys.argv[1]), Path(sys.argv[2]))
