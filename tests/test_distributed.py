"""Data-parallel training and launched stages, on this CPU machine (gloo).

- Two processes with per-process batch B give the same SFT, DPO and KTO trajectories as one process
  with batch 2B (the same global batch, the same rows in each step): sharding, DDP's gradient
  averaging and the loss normalization over the global item count add up to the same update. The
  same holds with the parameters sharded by FSDP2.
- GRPO and PPO too: each process samples its prompts with the global batch's noise, so two
  processes score the completions one process scores (PPO whitens over the global batch and
  weights each shard's token-mean loss by its tokens).
- A stage asking for two processes runs under `accelerate launch` from its Prefect task: one
  artifact and one MLflow run (rank 0's), its output in the task's log; a failing launched stage
  reaches the flow with its own error message.
- Mixed precision and gradient checkpointing resolve to fp32 / off on CPU, and checkpointing
  turned on by hand changes nothing but memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import deque
from pathlib import Path

import pytest
import torch

from posttrain import launch, stages, tracking
from posttrain.config import DemoTaskConfig, LaunchConfig, PipelineConfig, SFTConfig, validate
from posttrain.training import (
    enable_gradient_checkpointing,
    resolve_gradient_checkpointing,
    resolve_mixed_precision,
)
from tests.conftest import SFT_STAGE, stage, tiny_pipeline_values

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_worker.py"


def _worker(out: Path, nproc: int, *args: str) -> dict:
    if nproc == 1:
        cmd = [sys.executable, str(WORKER)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(nproc), str(WORKER)]
    done = subprocess.run([*cmd, str(out), *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_two_processes_follow_the_one_process_trajectory(tmp_path):
    """2 processes x 2 packed rows x 2 accumulated micro-batches vs 1 process x 4 x 2: every
    logged loss, accuracy, gradient norm, DPO margin and KTO z_ref agrees within 1e-5 (fp32), and
    so do the trained weights (KTO: only because z_ref is all-reduced over both shards)."""
    args = ("--packing", "--grad-accum", "2")
    two = _worker(tmp_path / "two.json", 2, "--batch", "2", *args)
    one = _worker(tmp_path / "one.json", 1, "--batch", "4", *args)
    assert two["world_size"] == 2 and two["distributed_type"] == "DistributedType.MULTI_CPU"
    assert one["world_size"] == 1
    for recipe in ("sft", "dpo", "kto"):
        assert [m["step"] for m in two[recipe]] == [1, 2, 3, 4, 5]
        for a, b in zip(one[recipe], two[recipe]):
            assert a.keys() == b.keys()
            for key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-5), (recipe, a["step"], key)
        assert two[f"{recipe}_weights"] == pytest.approx(one[f"{recipe}_weights"], rel=1e-6)
    losses = [m["loss"] for m in one["sft"]]
    assert losses[-1] < losses[0]  # it trained: equal trajectories are not trivially equal


def _rl_worker(out: Path, nproc: int, prompts: int) -> list[dict]:
    """tests/dist_rl_worker.py under torchrun (or plainly for one process): every process's
    output, by rank."""
    worker = ROOT / "tests" / "dist_rl_worker.py"
    cmd = [sys.executable, str(worker)] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
        str(nproc), str(worker)]
    done = subprocess.run([*cmd, str(out), "--prompts", str(prompts)], capture_output=True,
                          text=True, cwd=ROOT, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(nproc)]


# How the metrics of the shards make the global batch's: the same number of completions on
# each process (means of per-completion values average), token means weighted by each shard's
# completion tokens (∝ completions/mean_length), and the values of the synchronized update.
_RL_KEYS = {
    "grpo": {"mean": ("loss", "reward", "rewards/sevens/mean", "completions/mean_length"),
             "tokens": ("kl", "entropy"), "global": ("grad_norm",)},
    "ppo": {"mean": ("objective/kl", "objective/scores", "objective/rlhf_reward",
                     "completions/mean_length"),
            "tokens": ("loss/policy_avg", "policy/approxkl_avg"), "global": ("grad_norm",)},
}


def _combined(shards: list[dict], how: dict) -> dict:
    weights = [m["completions/mean_length"] for m in shards]
    out = {k: sum(m[k] for m in shards) / len(shards) for k in how["mean"]}
    out |= {k: sum(m[k] * w for m, w in zip(shards, weights)) / sum(weights)
            for k in how["tokens"]}
    for k in how["global"]:
        assert all(m[k] == pytest.approx(shards[0][k], abs=1e-6) for m in shards), k
        out[k] = shards[0][k]
    return out


@pytest.mark.slow
def test_two_process_grpo_and_ppo_follow_the_one_process_trajectory(tmp_path):
    """2 processes x 2 prompts vs 1 process x 4 (GRPO: 2 completions each, β = 0.1; PPO: one
    minibatch, two epochs), temperature 0.9 and top-k 40: each process samples its shard with
    the global batch's noise, so the two processes score exactly the completions the one process
    scores, in the same order, and the losses, rewards, KL (each shard's combined as the global
    batch's), gradient norms and trained weights agree within 1e-5 (fp32). PPO's token-mean
    losses are rescaled by each shard's share of the minibatch's tokens (`ppo._token_share`):
    without it the shards' completion lengths would weight the update differently."""
    two = _rl_worker(tmp_path / "two", 2, 2)
    (one,) = _rl_worker(tmp_path / "one", 1, 4)
    assert [s["world_size"] for s in two] == [2, 2] and one["world_size"] == 1
    steps = len(one["grpo_texts"]) - 1  # the last call scores the held-out prompts
    assert steps == 4
    for t in range(steps):
        assert two[0]["grpo_texts"][t] + two[1]["grpo_texts"][t] == one["grpo_texts"][t], t
    assert len({tuple(x) for x in one["grpo_texts"][:steps]}) == steps  # each step samples anew
    for recipe, how in _RL_KEYS.items():
        assert [m["step"] for m in one[recipe]] == [1, 2, 3, 4]
        for t, a in enumerate(one[recipe]):
            b = _combined([s[recipe][t] for s in two], how)
            for key, value in b.items():
                assert value == pytest.approx(a[key], abs=1e-5), (recipe, t + 1, key)
        for s in two:
            assert s[f"{recipe}_weights"] == pytest.approx(one[f"{recipe}_weights"], rel=1e-6)
    # They trained and sampled: equal trajectories are not trivially equal.
    assert one["grpo"][-1]["kl"] > 0 and one["ppo"][-1]["objective/kl"] != 0
    assert len({m["reward"] for m in one["grpo"]}) > 1


@pytest.mark.slow
def test_two_fsdp_processes_follow_the_one_process_trajectory(tmp_path):
    """FSDP2 (accelerate's `prepare` with an FSDP plugin, gloo on this CPU: see
    dist_worker.fsdp_accelerator) shards every decoder layer across the two processes, and SFT, DPO
    (with its reference copy) and KTO still follow the one-process trajectory within 1e-5:
    sharded gradients, clipping over DTensors and the global loss normalization agree."""
    args = ("--packing", "--grad-accum", "2")
    two = _worker(tmp_path / "two.json", 2, "--batch", "2", "--fsdp", *args)
    one = _worker(tmp_path / "one.json", 1, "--batch", "4", *args)
    assert two["distributed_type"] == "DistributedType.FSDP" and two["sharded"]
    assert not one["sharded"]
    for recipe in ("sft", "dpo", "kto"):
        assert len(two[recipe]) == len(one[recipe]) == 5
        for a, b in zip(one[recipe], two[recipe]):
            assert a.keys() == b.keys()
            for key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-5), (recipe, a["step"], key)
        assert two[f"{recipe}_weights"] == pytest.approx(one[f"{recipe}_weights"], rel=1e-6)


# ------------------------------------------------------------------------- launched stages


def _launched_cfg(tmp_path, stages=None, **sections) -> PipelineConfig:
    values = tiny_pipeline_values(tmp_path, stages, cpu_threads=1, launch={"num_processes": 2},
                                  **sections)
    return validate(PipelineConfig, values)


def _flow_run_logs(flow_run_id: str) -> str:
    """Every log line the Prefect server holds for one flow run (its tasks' included)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(log.message for log in logs)


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_sft_stage_runs_as_two_processes_from_its_task(tmp_path):
    from pipelines.flows import stage_flow

    cfg = _launched_cfg(tmp_path)
    result = stage_flow(cfg, ["sft"])
    assert [(r["stage"], r["status"]) for r in result["stages"]] == [("data", "ran"),
                                                                      ("sft", "ran")]
    sft_dirs = [p for p in (tmp_path / "artifacts" / "sft").iterdir() if p.is_dir()]
    assert len(sft_dirs) == 1  # no second artifact, no leftover temporary folder
    manifest = json.loads((sft_dirs[0] / "manifest.json").read_text())
    assert manifest["num_processes"] == 2
    assert (sft_dirs[0] / "model" / "model.safetensors").is_file()
    assert not (tmp_path / "artifacts" / ".launch").exists() or not any(
        (tmp_path / "artifacts" / ".launch").iterdir())

    c = tracking.client()
    parent = c.get_run(result["mlflow_run_id"])
    runs = c.search_runs([parent.info.experiment_id],
                         f"tags.mlflow.parentRunId = '{result['mlflow_run_id']}'")
    sft_runs = [r for r in runs if r.data.tags[tracking.STAGE_TAG] == "sft"]
    assert len(sft_runs) == 1  # rank 0 alone records
    assert sft_runs[0].data.tags["posttrain.num_processes"] == "2"
    history = c.get_metric_history(sft_runs[0].info.run_id, "loss")
    assert [m.step for m in history] == list(range(1, cfg.stage("sft").max_steps + 1))

    logged = _flow_run_logs(parent.data.tags["prefect.flow_run_id"])
    assert "accelerate.commands.launch" in logged and "--num_processes 2" in logged
    assert "Writing model shards" in logged  # the processes' own output, streamed

    again = stage_flow(cfg, ["sft"])  # cached: no launch at all
    assert [r["status"] for r in again["stages"]] == ["cached", "cached"]


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_a_failing_launched_stage_reaches_the_flow_with_its_own_message(tmp_path):
    """max_length=8 leaves no demo row: the SFT stage raises DataError in both processes; the
    flow's exception says so (not just 'child process failed')."""
    from pipelines.flows import stage_flow

    cfg = _launched_cfg(tmp_path, stages=[{**SFT_STAGE, "max_length": 8}])
    with pytest.raises(launch.StageLaunchError) as info:
        stage_flow(cfg, ["sft"])
    message = str(info.value)
    assert "DataError" in message and "no row fits in max_length=8" in message
    assert "ChildFailedError" not in message
    c = tracking.client()
    experiment = c.get_experiment_by_name(cfg.tracking.experiment)
    sft_runs = c.search_runs([experiment.experiment_id],
                             f"tags.`{tracking.STAGE_TAG}` = 'sft'")
    assert [r.info.status for r in sft_runs] == ["FAILED"]  # rank 0's run, closed as failed


@pytest.mark.slow
def test_recipe_entry_point_runs_under_torchrun(tmp_path):
    """`torchrun -m posttrain.recipes.sft`: data preparation on rank 0 alone, SFT on both ranks,
    one artifact and one MLflow run per stage."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "posttrain.recipes.sft", "--config", str(ROOT / "conf" / "demo.yaml"),
           "stages.sft.max_steps=3", "stages.sft.eval_every=3", "stages.sft.warmup_steps=1",
           "demo.num_train=300", "demo.num_eval=20", "model.tiny.hidden_size=32",
           "model.tiny.intermediate_size=64",
           "cpu_threads=1", "tracking.experiment=torchrun"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in ("data", "sft"):
        assert len(list((tmp_path / "artifacts" / name).iterdir())) == 1, name
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("torchrun")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags[tracking.STAGE_TAG] for r in runs) == ["data", "sft"]
    assert all(r.info.status == "FINISHED" for r in runs)


# --------------------------------------------------------------------------- launch pieces


def test_launch_command_multi_process_without_a_config_file():
    cmd = launch.launch_command(LaunchConfig(num_processes=4), "no", ["--stage", "sft"])
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--num_processes") + 1] == "4"
    assert "--multi_gpu" in cmd and "--config_file" not in cmd
    assert cmd[-4:] == ["-m", "posttrain.launch", "--stage", "sft"]


def test_launch_command_with_a_config_file_keeps_its_process_count_unless_asked():
    path = str(ROOT / "infra" / "accelerate" / "fsdp.yaml")
    cmd = launch.launch_command(LaunchConfig(accelerate_config=path), "bf16", [])
    assert cmd[cmd.index("--config_file") + 1] == path
    assert "--num_processes" not in cmd and "--multi_gpu" not in cmd
    cmd = launch.launch_command(LaunchConfig(accelerate_config=path, num_processes=8), "bf16", [])
    assert cmd[cmd.index("--num_processes") + 1] == "8"


def test_launched_means_several_processes_or_a_config_file():
    assert not LaunchConfig().launched
    assert LaunchConfig(num_processes=2).launched
    assert LaunchConfig(accelerate_config="infra/accelerate/single_gpu.yaml").launched


def test_stage_error_prefers_the_stages_own_exception(tmp_path):
    (tmp_path / "error-rank1.json").write_text(json.dumps(
        {"type": "DataError", "message": "sft_train.jsonl: row 3: empty completion"}))
    (tmp_path / "error-rank0.json").write_text(json.dumps(
        {"type": "SystemExit", "message": "143"}))  # rank 0 was stopped by the launcher
    tail = deque(["Traceback (most recent call last):",
                  "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: "])
    assert launch._stage_error(tmp_path, tail) == (
        "DataError: sft_train.jsonl: row 3: empty completion")


def test_stage_error_falls_back_on_the_last_exception_line(tmp_path):
    tail = deque(["[rank0]: Traceback (most recent call last):",
                  "ValueError: learning rate exploded",
                  "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ",
                  ("subprocess.CalledProcessError: Command '[...]' returned non-zero exit "
                   "status 1.")])
    assert launch._stage_error(tmp_path, tail) == "ValueError: learning rate exploded"


def test_unknown_stage_cannot_be_launched(tmp_path):
    cfg = validate(PipelineConfig, tiny_pipeline_values(tmp_path))
    with pytest.raises(KeyError, match="no stage named 'evaluate'"):
        launch.run_stage_by_name(cfg, "evaluate", {})


def test_the_launch_shapes_the_training_stage_keys(tmp_path):
    """Two processes double the global batch: another result, another key. An accelerate config
    file counts by its contents."""
    data = {"digest": "d" * 64, "datasets": {
        "sft": {"format": "prompt_completion", "fingerprint": "f" * 64},
        "preference": {"format": "preference", "fingerprint": "g" * 64}}}
    sft_inputs = {"data": data, "start": None, "reward": None}
    dpo_inputs = {**sft_inputs, "start": {"digest": "e" * 64}}
    chain = [SFT_STAGE, stage("dpo")]
    base = validate(PipelineConfig, tiny_pipeline_values(tmp_path, chain))
    two = validate(PipelineConfig, tiny_pipeline_values(tmp_path, chain,
                                                        launch={"num_processes": 2}))
    assert stages.stage_key(base, "sft", sft_inputs) != stages.stage_key(two, "sft", sft_inputs)
    assert stages.stage_key(base, "dpo", dpo_inputs) != stages.stage_key(two, "dpo", dpo_inputs)
    conf = tmp_path / "acc.yaml"
    conf.write_text("distributed_type: MULTI_GPU\n")
    with_file = validate(PipelineConfig, tiny_pipeline_values(
        tmp_path, launch={"accelerate_config": str(conf)}))
    key = stages.stage_key(with_file, "sft", sft_inputs)
    conf.write_text("distributed_type: FSDP\n")
    assert stages.stage_key(with_file, "sft", sft_inputs) != key
    conf.unlink()
    with pytest.raises(FileNotFoundError, match="accelerate_config"):
        stages.stage_key(with_file, "sft", sft_inputs)


# ------------------------------------------------------------------------------ GPU switches


def test_auto_resolves_to_fp32_and_no_checkpointing_on_cpu():
    assert resolve_mixed_precision("auto", cuda=False) == "no"
    assert resolve_mixed_precision("auto", cuda=True) in ("bf16", "fp16")
    assert resolve_mixed_precision("fp16", cuda=False) == "fp16"  # explicit wins
    assert resolve_gradient_checkpointing("auto", cuda=False) is False
    assert resolve_gradient_checkpointing("auto", cuda=True) is True
    assert resolve_gradient_checkpointing(True, cuda=False) is True
    if not torch.cuda.is_available():
        assert resolve_mixed_precision("auto") == "no"
        assert resolve_gradient_checkpointing("auto") is False
    defaults = PipelineConfig().model
    assert defaults.mixed_precision == "auto" and defaults.gradient_checkpointing == "auto"


def test_gradient_checkpointing_changes_nothing_but_memory():
    """Six SFT steps with and without checkpointing from the same model: the same losses."""
    from posttrain.data import demo
    from posttrain.data.tokenize import tokenize_sft_rows
    from posttrain.models import build_tiny_model, build_tiny_tokenizer
    from posttrain.recipes import sft
    from tests.test_recipe_sft import TINY

    tokenizer = build_tiny_tokenizer()
    rows = demo.generate_sft(DemoTaskConfig(num_train=100, num_eval=10), 0, "train")
    examples, _ = tokenize_sft_rows(rows, tokenizer, max_length=48)
    cfg = SFTConfig(max_steps=6, per_device_batch_size=4, learning_rate=3e-3, warmup_steps=1,
                    max_length=48, eval_every=6, log_every=1)
    losses = {}
    for on in (False, True):
        model = build_tiny_model(TINY, tokenizer)
        assert enable_gradient_checkpointing(model, on) is on
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) is on
        losses[on] = history = []
        sft.train(model, examples, examples[:8], cfg, pad_token_id=tokenizer.pad_token_id,
                  log_metrics=lambda m, s, into=history: into.append(m["loss"]))
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_grpo_stage_runs_as_two_processes(tmp_path):
    from pipelines.flows import stage_flow

    cfg = _launched_cfg(tmp_path, [SFT_STAGE, stage("grpo", warmup_steps=0, max_length=40)])
    result = stage_flow(cfg, ["grpo"])
    assert [(r["stage"], r["status"]) for r in result["stages"]][-1] == ("grpo", "ran")
    grpo_dir = next(p for p in (tmp_path / "artifacts" / "grpo").iterdir()
                    if (p / "manifest.json").is_file())
    assert json.loads((grpo_dir / "manifest.json").read_text())["num_processes"] == 2
