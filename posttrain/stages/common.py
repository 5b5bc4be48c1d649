"""What every stage shares: the content key, the idempotent artifact, the MLflow child run.

Under `accelerate launch`/`torchrun` only rank 0 looks up the cache, writes the artifact and
talks to MLflow. A training stage's body runs on every process (the training is data-parallel;
the other ranks write into a throw-away folder); any other stage's body runs on rank 0 alone.
Every rank returns the manifest rank 0 wrote.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from posttrain import artifacts, disk, interrupt, tracking
from posttrain.config import ModelConfig, PipelineConfig
from posttrain.vision.models import is_vision_model, load_processor, load_vlm, prepare_trainable

# Lazy imports: models, training and checkpoints (torch, accelerate) load only where a stage
# trains; every stage module, the flows and preflight import this one.


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

    SIGINT and SIGTERM stop the stage at its next step boundary (posttrain.interrupt): its run is
    marked KILLED and nothing half-written stays.
    """
    with interrupt.stage(stage):
        return _run_stage(cfg, stage, key, params, body, parent_run_id=parent_run_id,
                          data_parallel=data_parallel)


def _run_stage(cfg: PipelineConfig, stage: str, key: str, params: dict, body, *,
               parent_run_id: str | None, data_parallel: bool) -> dict:
    if cfg.cpu_threads:
        import torch

        torch.set_num_threads(cfg.cpu_threads)
    main = is_main_process()
    if main:
        _clean_up_after_killed_runs(cfg, stage)
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


def _clean_up_after_killed_runs(cfg: PipelineConfig, stage: str) -> None:
    """What a run of this stage killed with SIGKILL left: its MLflow runs still RUNNING (marked
    KILLED with the reason) and its half-written `.tmp-*` artifact folders (removed). Only
    leftovers whose owner process is gone are touched; a live concurrent run's stay."""
    for path in artifacts.remove_dead_tmp(Path(cfg.artifacts_root) / stage):
        print(f"removed {path}, left by a run of stage {stage} that was killed")
    try:
        closed = tracking.close_orphaned_runs(
            cfg.tracking.experiment, {tracking.STAGE_TAG: stage},
            closer=f"the next run of stage {stage!r}")
    except Exception as e:  # noqa: BLE001 - a cleanup must never stop the stage
        print(f"could not check for runs of stage {stage} left RUNNING: {type(e).__name__}: {e}")
        return
    if closed:
        print(f"marked {len(closed)} MLflow run(s) of stage {stage} left RUNNING by a killed "
              f"process as KILLED: {', '.join(closed)}")


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
        training = next((s for s in cfg.stages if s.name == stage), None)
        needed = (lambda: disk.model_bytes(cfg.model)) if training is not None else None
        with artifacts.write_stage(cfg.artifacts_root, stage, key, needed) as out:
            out.meta.update(config=params, mlflow_run_id=run_id, num_processes=world_size())
            metrics = body(out, run_id)
            out.meta["metrics"] = metrics
            out.meta["seconds"] = round(time.time() - started, 3)
            (out.dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        tracking.log_folder(run_id, out.manifest["path"], cfg.tracking.max_artifact_mb)
        tracking.end_run(run_id)
    except BaseException as e:
        stop = interrupt.stopped_by_peer(e)
        interrupted = stop is not None or isinstance(e, KeyboardInterrupt)
        tracking.end_run(run_id, "KILLED" if interrupted else "FAILED",
                         reason=f"{type(stop or e).__name__}: {stop or e}")
        if stop is not None:
            raise stop from e
        raise
    _remove_checkpoints(cfg, stage, key)
    return out.manifest


def _remove_checkpoints(cfg: PipelineConfig, stage: str, key: str) -> None:
    """A complete artifact needs no checkpoints: delete them unless the stage keeps them."""
    training = next((s for s in cfg.stages if s.name == stage), None)
    if training is not None and not training.keep_checkpoints:
        from posttrain import checkpoints  # torch and accelerate: only where a stage trained

        checkpoints.remove(checkpoint_dir(cfg, training, key))


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


# ------------------------------------------------------------------------- the stage graph
#
# A training stage gets its upstream manifests as `inputs`: {"data": the data stage's manifest,
# "start": the manifest of the stage it starts from (None: the base model), "reward": the reward
# stage's manifest (None when it uses none)}.

SETTINGS_EXCLUDED = ("name", "start", "data", "reward")
# Settings that change how a stage is checkpointed, not what it trains: not in its cache key, so
# changing them neither retrains a finished stage nor keeps a rerun from resuming.
NOT_IN_KEY = ("checkpoint_every", "checkpoint_keep", "keep_checkpoints")


def settings(stage) -> dict:
    """A stage's own settings: its method's config without the graph fields."""
    return {k: v for k, v in dump(stage).items() if k not in SETTINGS_EXCLUDED}


def base_fingerprint(model_cfg) -> str:
    """What identifies the base model's weights: the built-in model's config, a local folder's
    contents (small files whole; weight files by size and their first and last MiB, enough to
    tell two checkpoints apart without reading gigabytes), or a hub id with its revision."""
    if model_cfg.name_or_path == "tiny":
        return artifacts.hash_json(["tiny", dump(model_cfg.tiny)])
    folder = Path(model_cfg.name_or_path)
    if not folder.is_dir():
        return artifacts.hash_json(["hub", model_cfg.name_or_path, model_cfg.revision])
    parts = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        size = path.stat().st_size
        if size <= 8 << 20:
            parts.append([str(path.relative_to(folder)), artifacts.sha256_file(path)])
            continue
        with path.open("rb") as f:
            head = f.read(1 << 20)
            f.seek(-(1 << 20), os.SEEK_END)
            tail = f.read()
        parts.append([str(path.relative_to(folder)), size, hashlib.sha256(head + tail).hexdigest()])
    return artifacts.hash_json(parts)


def model_params(cfg: PipelineConfig) -> dict:
    """The model settings a training stage's result depends on, the base model by content."""
    return {**dump(cfg.model), "name_or_path": base_fingerprint(cfg.model)}


def source_of(cfg: PipelineConfig, stage, data_manifest: dict) -> dict:
    """The prepared data source a stage reads: its manifest entry (rows, format, fingerprint)."""
    entry = data_manifest["datasets"][stage.data]
    return {**entry, "name": stage.data, "dir": data_manifest.get("path")}


def training_key(cfg: PipelineConfig, stage, inputs: dict) -> str:
    """The content key of a training stage: its method and settings, the model it starts from
    (the base model's content, or the digest of the start stage), the reward stage it uses, the
    content of its data source, the launch shape and the code version. The stage's name is not
    in it: renaming a stage is not a new result."""
    src = source_of(cfg, stage, inputs["data"])
    source_cfg = cfg.data[stage.data]
    upstream = {"start": digest(inputs["start"]) if inputs.get("start") else "base"}
    if inputs.get("reward") is not None:
        upstream["reward"] = digest(inputs["reward"])
    upstream.update(_distillation_upstream(cfg, stage, inputs))
    config = {"settings": {k: v for k, v in settings(stage).items() if k not in NOT_IN_KEY},
              "model": model_params(cfg),
              "launch": launch_params(cfg),
              "data": {"format": src["format"], "seed": source_cfg.seed,
                       "max_drop_fraction": source_cfg.max_drop_fraction}}
    return artifacts.stage_key(stage.method, config, upstream=upstream,
                               data_fingerprint=src["fingerprint"])


def _distillation_upstream(cfg: PipelineConfig, stage, inputs: dict) -> dict:
    """GKD's extra upstream: the teacher (its stage's digest, or a folder's content) and a
    `student` model section's weights by content (as the base model's). A caller whose inputs
    lack the teacher stage's manifest (a plan, the Prefect task's cache key) gets it looked up
    by the teacher's own key; a teacher not trained yet keys as such (no artifact has it)."""
    out = {}
    teacher = getattr(stage, "teacher", None)
    if inputs.get("teacher") is None and teacher in {s.name for s in cfg.stages}:
        found = existing(cfg, teacher, inputs["data"], {}, full=False)
        out["teacher"] = digest(found) if found is not None else "not trained yet"
    elif inputs.get("teacher") is not None:
        out["teacher"] = digest(inputs["teacher"])
    elif getattr(stage, "teacher", None) is not None and Path(stage.teacher).is_dir():
        out["teacher"] = base_fingerprint(ModelConfig(name_or_path=stage.teacher))
    if getattr(stage, "student", None) is not None:
        out["student"] = base_fingerprint(stage.student)
    return out


def inputs_for(stage, data: dict, manifests: dict[str, dict]) -> dict:
    """The upstream manifests of `stage`: the data, the stage it starts from (None: the base
    model), the reward stage it uses (or None) and, for GKD, the teacher stage (absent when the
    teacher is a folder)."""
    inputs = {"data": data,
              "start": None if stage.start == "base" else manifests[stage.start],
              "reward": manifests[stage.reward] if stage.reward else None}
    teacher = getattr(stage, "teacher", None)
    if teacher is not None and teacher != "data" and teacher in manifests:
        inputs["teacher"] = manifests[teacher]
    return inputs


def existing(cfg: PipelineConfig, name: str, data: dict, found: dict, *,
             full: bool = True) -> dict | None:
    """The verified artifact of stage `name` as the graph would key it now, or None (it, or a
    stage it needs, has not run). `full`: verify every file's hash (False: the listing)."""
    s = cfg.stage(name)
    names = {x.name for x in cfg.stages}
    for dep in (s.start, s.reward, getattr(s, "teacher", None)):
        if dep in names and dep not in found:
            found[dep] = existing(cfg, dep, data, found, full=full)
            if found[dep] is None:
                return None
    return artifacts.load_manifest(cfg.artifacts_root, name,
                                   training_key(cfg, s, inputs_for(s, data, found)), full=full)


def start_dir(inputs: dict) -> Path | None:
    """The model folder a stage starts from; None for the base model."""
    start = inputs.get("start")
    return Path(start["path"]) / "model" if start else None


def start_tokenizer(cfg: PipelineConfig, inputs: dict):
    """The tokenizer of the model the stage starts from."""
    from posttrain.models import load_tokenizer

    return load_tokenizer(cfg.model, path=start_dir(inputs))


def start_processor(cfg: PipelineConfig, inputs: dict):
    """The processor (tokenizer and image processor) of the vision-language model the stage
    starts from."""
    return load_processor(cfg.model, path=start_dir(inputs))


def load_policy(cfg: PipelineConfig, inputs: dict):
    """The policy a training stage starts from (the base model or an earlier stage's), with the
    configured gradient checkpointing and LoRA adapters applied (a vision-language model: its
    vision tower frozen unless model.train_vision_tower, LoRA on its language model)."""
    from posttrain.models import apply_lora, load_causal_lm
    from posttrain.training import enable_gradient_checkpointing

    if is_vision_model(cfg.model):
        policy = load_vlm(cfg.model, path=start_dir(inputs))
        enable_gradient_checkpointing(policy, cfg.model.gradient_checkpointing)
        return prepare_trainable(policy, cfg.model)
    policy = load_causal_lm(cfg.model, path=start_dir(inputs))
    enable_gradient_checkpointing(policy, cfg.model.gradient_checkpointing)
    if cfg.model.lora is not None:
        policy = apply_lora(policy, cfg.model.lora)
    return policy


def checkpoint_dir(cfg: PipelineConfig, stage, key: str) -> Path:
    return Path(cfg.artifacts_root) / stage.name / f"{key}.checkpoints"


def run_params(cfg: PipelineConfig, stage) -> dict:
    """The MLflow params of a training stage's run: its settings under their own names, the
    same for every stage (`learning_rate`, `beta`, `max_steps`, `method`), so that MLflow's run
    comparison lines them up; what it starts from, its data and reward stage; and the model."""
    return {**settings(stage), "starts_from": stage.start, "data": stage.data,
            "reward": stage.reward, "model": cfg.model.name_or_path,
            "lora": dump(cfg.model.lora) if cfg.model.lora else None}
