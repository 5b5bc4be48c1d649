"""The stage graph as users write it: stages from any starting model, chains, the same method
twice, caching that follows the graph, user data in public dataset schemas on a local chat model
with a byte-level BPE tokenizer, and reward functions written for TRL."""

from __future__ import annotations

import json
import math

import pytest

from posttrain import stages, tracking
from posttrain.config import PipelineConfig, validate
from posttrain.data.loading import write_jsonl
from tests._chat_model import build_chat_model
from tests.conftest import SFT_STAGE, stage, stage_runs, statuses, tiny_pipeline_values

QUESTIONS = ["What is the capital of France?", "How many legs does a spider have?",
             "Translate 'good morning' to Spanish.", "Explain photosynthesis briefly.",
             "Write a haiku about the sea.", "What is 48 + 24?"]
GOOD = ["Paris.", "Eight.", "Buenos dias.", "Plants turn light into sugar.",
        "Waves fold into foam.", "72."]


def _ultrafeedback_rows(n: int) -> list[dict]:
    """Rows in trl-lib/ultrafeedback_binarized's schema: chosen/rejected conversations with the
    prompt as their shared first turn (implicit prompt), plus score columns."""
    rows = []
    for i in range(n):
        q, good, bad = QUESTIONS[i % 6], GOOD[i % 6], GOOD[(i + 1) % 6]
        user = {"role": "user", "content": f"{q} ({i})"}
        rows.append({"chosen": [user, {"role": "assistant", "content": good}],
                     "rejected": [user, {"role": "assistant", "content": bad}],
                     "score_chosen": 8.0, "score_rejected": 3.0})
    return rows


def _ultrachat_rows(n: int) -> list[dict]:
    """Rows in HuggingFaceH4/ultrachat_200k's schema: prompt, prompt_id and a multi-turn
    `messages` conversation."""
    return [{"prompt": QUESTIONS[i % 6], "prompt_id": f"id{i}",
             "messages": [{"role": "user", "content": QUESTIONS[i % 6]},
                          {"role": "assistant", "content": GOOD[i % 6]},
                          {"role": "user", "content": "Thanks! Once more?"},
                          {"role": "assistant", "content": GOOD[i % 6]}]} for i in range(n)]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return build_chat_model(tmp_path_factory.mktemp("chat") / "model")


# --------------------------------------------------------------------- no SFT, user's model


@pytest.mark.slow
def test_dpo_straight_from_a_users_chat_model_starts_at_ln2(tmp_path, chat_model):
    """DPO from `base` on a local chat model with ultrafeedback-style pairs: no SFT step runs
    before it, nothing but the named source is loaded, and at the first step policy =
    reference, so the sigmoid loss is -log sigmoid(0) = ln 2 = 0.693147."""
    pairs = tmp_path / "pairs.jsonl"
    write_jsonl(_ultrafeedback_rows(60), pairs)
    values = tiny_pipeline_values(
        tmp_path, [stage("dpo", start="base", loss_type="sigmoid", learning_rate=1e-4,
                         max_length=64)],
        data={"preference": {"path": str(pairs), "eval_fraction": 0.2}},
        model={"name_or_path": str(chat_model)},
        evaluate={"data": "preference"})
    values["data"] = {"preference": values["data"]["preference"]}  # the user's one source
    cfg = validate(PipelineConfig, values)
    manifests = stages.run_all(cfg)
    assert set(manifests["data"]["datasets"]) == {"preference"}
    assert sorted(p.name for p in (tmp_path / "artifacts").iterdir()
                  if not p.name.startswith(".")) == ["data", "dpo", "evaluate"]
    losses = tracking.client().get_metric_history(manifests["dpo"]["mlflow_run_id"], "loss")
    first = min(losses, key=lambda m: m.step)
    assert first.step == 1
    assert first.value == pytest.approx(math.log(2), abs=1e-5)
    comparison = manifests["evaluate"]["comparison"]
    assert list(comparison) == ["base", "dpo"]
    assert comparison["dpo"]["eval_loss"] != comparison["base"]["eval_loss"]  # it trained
    assert "checker_accuracy" not in comparison["dpo"]  # no checker for user data


# ---------------------------------------------------------------- chains and their caching


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_a_chain_caches_along_the_graph(tmp_path):
    """sft -> dpo -> grpo: changing dpo's beta re-runs dpo, grpo and evaluation and nothing
    upstream; adding a second DPO stage trains only that stage (and evaluation)."""
    from pipelines.flows import pipeline

    def cfg(dpo_beta: float, extra: list[dict] = ()):
        chain = [SFT_STAGE, stage("dpo", beta=dpo_beta), stage("grpo", start="dpo"), *extra]
        return validate(PipelineConfig, tiny_pipeline_values(
            tmp_path, chain, evaluate={"reference": "sft"}, promotion={"enabled": False}))

    first = pipeline(cfg(0.1))
    assert set(statuses(first).values()) == {"ran"}
    assert list(first["comparison"]) == ["base", "sft", "dpo", "grpo"]
    children = stage_runs(first["mlflow_run_id"])
    assert children["grpo"].data.params["starts_from"] == "dpo"

    changed = pipeline(cfg(0.3))
    assert statuses(changed) == {"data": "cached", "sft": "cached", "dpo": "ran", "grpo": "ran",
                                "evaluate": "ran"}
    dpo_b05 = stage("dpo", "dpo-b05", beta=0.5)
    added = pipeline(cfg(0.3, [dpo_b05]))
    assert statuses(added) == {"data": "cached", "sft": "cached", "dpo": "cached",
                              "grpo": "cached", "dpo-b05": "ran", "evaluate": "ran"}
    assert list(added["comparison"]) == ["base", "sft", "dpo", "grpo", "dpo-b05"]
    # Each DPO stage has its own folder, child run and settings.
    runs = stage_runs(added["mlflow_run_id"])
    assert runs["dpo-b05"].data.params["beta"] == "0.5"
    assert (tmp_path / "artifacts" / "dpo-b05").is_dir()


def test_only_the_stages_reading_a_changed_source_rerun(tmp_path):
    """Stage keys hold their own source's content: editing the prompts file re-runs GRPO,
    not SFT or DPO."""
    from posttrain.data import demo

    prompts = tmp_path / "prompts.jsonl"
    rows = demo.generate_prompts(validate(PipelineConfig, tiny_pipeline_values(tmp_path)).demo,
                                 0, "train")[:64]
    write_jsonl(rows, prompts)
    chain = [SFT_STAGE, stage("dpo"), stage("grpo", start="dpo")]
    values = tiny_pipeline_values(tmp_path, chain, evaluate={"enabled": False},
                                  data={"prompts": {"path": str(prompts)}})
    first = stages.run_all(validate(PipelineConfig, values))
    write_jsonl(rows[:-1], prompts)
    second = stages.run_all(validate(PipelineConfig, values))
    assert not second["data"]["cached"]
    assert second["sft"]["cached"] and second["dpo"]["cached"]
    assert not second["grpo"]["cached"]
    assert second["grpo"]["key"] != first["grpo"]["key"]


# ------------------------------------------------------------ reward functions, TRL's way


REWARD_MODULE = '''
import json, os

def accuracy(completions, solution, **kwargs):
    """Written for TRL's GRPOTrainer: completions are message lists for chat prompts."""
    with open(os.environ["REWARD_CALLS"], "a") as f:
        f.write(json.dumps({"completion": completions[0], "solution": solution[0],
                            "kwargs": sorted(kwargs)}) + "\\n")
    return [1.0 if s in c[0]["content"] else 0.0 for c, s in zip(completions, solution)]
'''


@pytest.mark.slow
def test_grpo_calls_a_reward_function_written_for_trl(tmp_path, chat_model, monkeypatch):
    """`def accuracy(completions, solution, **kwargs)` from a module on the path, on
    gsm8k-style rows (a conversational prompt and a `solution` column)."""
    (tmp_path / "my_rewards.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("REWARD_CALLS", str(tmp_path / "calls.jsonl"))
    rows = [{"prompt": [{"role": "user", "content": q}], "solution": g.rstrip("."),
             "level": i % 3} for i, (q, g) in enumerate(zip(QUESTIONS * 6, GOOD * 6))]
    write_jsonl(rows, tmp_path / "math.jsonl")
    grpo = stage("grpo", start="base", max_length=64, max_completion_length=6,
                 reward_functions={"my_rewards:accuracy": 1.0})
    values = tiny_pipeline_values(tmp_path, [grpo], model={"name_or_path": str(chat_model)},
                                  data={"prompts": {"path": str(tmp_path / "math.jsonl")}},
                                  evaluate={"enabled": False})
    cfg = validate(PipelineConfig, values)
    from posttrain import preflight

    preflight.plan(cfg)  # the signature check accepts it: `solution` is a column
    manifests = stages.run_all(cfg)
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert calls, "the reward function was never called"
    assert calls[0]["completion"][0]["role"] == "assistant"  # a message list, as in TRL
    assert calls[0]["solution"] in [g.rstrip(".") for g in GOOD]
    assert calls[0]["kwargs"] == ["level", "prompts"]  # every other column, by name
    history = tracking.client().get_metric_history(manifests["grpo"]["mlflow_run_id"],
                                                   "rewards/accuracy/mean")
    assert len(history) == grpo["max_steps"]


# -------------------------------------------------- messages data through evaluation/promotion


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_a_messages_pipeline_evaluates_and_promotes_on_held_out_loss(tmp_path, chat_model):
    """SFT on ultrachat-style `messages` rows: evaluation takes the conversation up to the
    last assistant turn as the prompt, and promotion, with no checker and no reward model,
    defaults to eval_loss (lower is better)."""
    from pipelines.flows import pipeline
    from posttrain import preflight, registry

    chats = tmp_path / "chats.jsonl"
    write_jsonl(_ultrachat_rows(80), chats)
    name = f"reg-{tmp_path.name}"
    values = tiny_pipeline_values(
        tmp_path, [{**SFT_STAGE, "max_length": 96, "learning_rate": 3e-3, "max_steps": 8}],
        model={"name_or_path": str(chat_model)},
        data={"sft": {"path": str(chats), "eval_fraction": 0.1}},
        evaluate={"max_length": 96}, promotion={"registered_model": name})
    values["data"] = {"sft": values["data"]["sft"]}
    cfg = validate(PipelineConfig, values)
    plan = preflight.plan(cfg)
    assert plan.promotion["metric"] == "eval_loss" and plan.promotion["direction"] == "min"
    result = pipeline(cfg)
    comparison = result["comparison"]
    assert set(comparison) == {"base", "sft"}
    assert comparison["sft"]["eval_loss"] < comparison["base"]["eval_loss"]
    assert "checker_accuracy" not in comparison["sft"]
    assert result["promotion"]["promote"] and result["promotion"]["winner"] == "sft"
    assert registry.champion_version(name).tags[registry.STAGE_TAG] == "sft"
