"""What every stage shares: the content key, the idempotent artifact, the MLflow child run.

Under `accelerate launch`/`torchrun` only rank 0 looks up the cache, writes the artifact and
talks to MLflow. A training stage's body runs on every process (the training is data-parallel;
the other ranks write into a throw-away folder); any other stage's body runs on rank 0 alone.
Every rank returns the manifest rank 0 wrote.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from posttrain import artifacts, tracking
from posttrain.config import PipelineConfig


def dump(model) -> dict:
    return model.model_dump(mode="json")


def digest(manifest: dict) -> str:
    return manifest["digest"]


def save_trained(accelerator, model, tokenizer, out_dir: Path) -> None:
    """Save a trained model and its tokenizer from rank 0 (posttrain.models.save_model), after
    gathering the weights where FSDP or DeepSpeed ZeRO-3 shard them (all ranks take part)."""
    from posttrain.models import save_model
    from posttrain.training import gathered_state_dict

    state = gathered_state_dict(accelerator, model)
    if not is_main_process():
        return
    if state is None:
        save_model(model, tokenizer, out_dir)
        return
    if hasattr(model, "peft_config"):
        raise NotImplementedError("saving a LoRA model trained with FSDP or ZeRO-3 is not "
                                  "supported; train LoRA with DDP (multi_gpu_ddp.yaml)")
    model.save_pretrained(out_dir, state_dict=state)
    tokenizer.save_pretrained(out_dir)


def launch_params(cfg: PipelineConfig) -> dict:
    """What of the launch shapes a training stage's result, for its key: the process count (the
    global batch is per_device_batch_size x processes x grad_accum), the autocast setting and
    the accelerate config file's contents (never its path alone)."""
    path = cfg.launch.accelerate_config
    if path is not None and not Path(path).is_file():
        raise FileNotFoundError(f"launch.accelerate_config: {path} does not exist")
    return {"num_processes": cfg.launch.num_processes,
            "accelerate_config": artifacts.sha256_file(path) if path else None,
            "mixed_precision": cfg.model.mixed_precision}


def run_stage(
    cfg: PipelineConfig,
    stage: str,
    key: str,
    params: dict,
    body: Callable[[artifacts.StageOutput, str | None], dict],
    *,
    parent_run_id: str | None = None,
    data_parallel: bool = False,
) -> dict:
    """Return the artifact of (stage, key), producing it with `body(out, run_id)` if needed.

    `body` writes files into `out.dir`, may add JSON facts to `out.meta`, and returns the stage's
    final metrics. The returned manifest carries `cached` (True when nothing ran).

    In a multi-process launch, a `data_parallel` body (training) runs on every rank: on ranks
    other than 0 with `run_id` None and `out.dir` a throw-away folder. Any other body runs on
    rank 0 alone while the other ranks wait for its manifest.
    """
    if cfg.cpu_threads:
        import torch

        torch.set_num_threads(cfg.cpu_threads)
    main = is_main_process()
    existing = _from_main(artifacts.load_manifest(cfg.artifacts_root, stage, key) if main else None)
    if existing is not None:
        if main:
            tracking.record_cache_hit(cfg.tracking.experiment, parent_run_id, stage, existing)
        return {**existing, "cached": True}
    run_id = _start_run(cfg, stage, key, params, parent_run_id) if main else None
    if not data_parallel:
        manifest = _produce(cfg, stage, key, params, body, run_id) if main else None
        return {**_from_main(manifest), "cached": False}
    _from_main(None)  # the other ranks start once rank 0's run exists, so a failure finds it
    if not main:
        scratch = Path(tempfile.mkdtemp(prefix=f"posttrain-{stage}-rank{os.environ['RANK']}-"))
        try:
            body(artifacts.StageOutput(dir=scratch), None)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return {**_from_main(None), "cached": False}
    return {**_from_main(_produce(cfg, stage, key, params, body, run_id)), "cached": False}


def _start_run(cfg: PipelineConfig, stage: str, key: str, params: dict,
               parent_run_id: str | None) -> str:
    tags = {tracking.STAGE_TAG: stage, tracking.KEY_TAG: key}
    if world_size() > 1:
        tags["posttrain.num_processes"] = str(world_size())
    return tracking.start_run(cfg.tracking.experiment, stage, parent_run_id=parent_run_id,
                              params=params, tags=tags)


def _produce(cfg: PipelineConfig, stage: str, key: str, params: dict, body, run_id: str) -> dict:
    """Run `body` inside the atomic artifact writer, recording into MLflow run `run_id`."""
    started = time.time()
    try:
        with artifacts.write_stage(cfg.artifacts_root, stage, key) as out:
            out.meta.update(config=params, mlflow_run_id=run_id, num_processes=world_size())
            metrics = body(out, run_id)
            out.meta["metrics"] = metrics
            out.meta["seconds"] = round(time.time() - started, 3)
            (out.dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        tracking.log_folder(run_id, out.manifest["path"], cfg.tracking.max_artifact_mb)
        tracking.end_run(run_id)
    except BaseException as e:
        tracking.end_run(run_id, "FAILED", reason=f"{type(e).__name__}: {e}")
        raise
    return out.manifest


# ----------------------------------------------------------------------------- distributed


def world_size() -> int:
    """Processes of this launch: WORLD_SIZE as set by torchrun / accelerate launch, else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0 of a launch, or the only process: the one that writes artifacts and records."""
    return int(os.environ.get("RANK", "0")) == 0


def _from_main(value):
    """`value` as rank 0 has it, on every rank of a launch (a pickled broadcast); alone: `value`."""
    if world_size() == 1:
        return value
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    from posttrain.training import cpu_processes

    PartialState(cpu=cpu_processes())  # joins the launcher's process group if nothing has yet
    return broadcast_object_list([value])[0]


def record_oom_backoff(out: artifacts.StageOutput, run_id: str):
    """The `on_backoff` of training.with_oom_backoff: note each batch change in the manifest and
    as an MLflow tag, so a result trained on a smaller micro-batch says so."""
    def record(old, new) -> None:
        change = {"per_device_batch_size": [old.per_device_batch_size, new.per_device_batch_size],
                  "grad_accum": [old.grad_accum, new.grad_accum]}
        out.meta.setdefault("oom_backoff", []).append(change)
        if run_id:
            tracking.client().set_tag(run_id, "posttrain.oom_backoff",
                                      json.dumps(out.meta["oom_backoff"]))
    return record


def load_policy(cfg: PipelineConfig, model_dir: Path):
    """The policy a training stage starts from: a saved model, with the configured gradient
    checkpointing and LoRA adapters applied."""
    from posttrain.models import apply_lora, load_trained
    from posttrain.training import enable_gradient_checkpointing

    policy = load_trained(model_dir, dtype=cfg.model.dtype,
                          attn_implementation=cfg.model.attn_implementation)
    enable_gradient_checkpointing(policy, cfg.model.gradient_checkpointing)
    if cfg.model.lora is not None:
        policy = apply_lora(policy, cfg.model.lora)
    return policy
