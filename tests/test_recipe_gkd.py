"""GKD recipe on tiny models: a narrow student learns a wider SFT-trained teacher (the JSD to
the teacher falls), its parameters move, and lmbda decides how often the student samples."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.config import DemoTaskConfig, GKDConfig, SFTConfig, TinyModelConfig
from posttrain.data import demo
from posttrain.data.tokenize import tokenize_sft_rows
from posttrain.models import build_tiny_model
from posttrain.recipes import gkd, sft

WIDE = TinyModelConfig(hidden_size=64, intermediate_size=128, seed=1)
NARROW = TinyModelConfig(hidden_size=32, intermediate_size=64, seed=0)


@pytest.fixture(scope="module")
def examples(tokenizer):
    rows = demo.generate_sft(DemoTaskConfig(num_train=200, num_eval=20), 0, "train")
    ex, report = tokenize_sft_rows(rows, tokenizer, max_length=48)
    assert report["rows_out"] == len(rows)
    return ex


@pytest.fixture(scope="module")
def teacher(tokenizer, examples):
    model = build_tiny_model(WIDE, tokenizer)
    cfg = SFTConfig(max_steps=30, per_device_batch_size=8, learning_rate=3e-3, warmup_steps=2,
                    max_length=48, eval_every=1000, log_every=1000)
    sft.train(model, examples, examples[:8], cfg, pad_token_id=tokenizer.pad_token_id)
    return model.eval().requires_grad_(False)


def _config(**overrides) -> GKDConfig:
    return GKDConfig(**{"teacher": "sft", "max_steps": 12, "per_device_batch_size": 4,
                        "learning_rate": 3e-3, "warmup_steps": 1, "max_length": 48,
                        "max_new_tokens": 12, "eval_every": 12, "log_every": 1,
                        "lmbda": 0.5, **overrides})


def _counting_sampler(calls: list):
    def sample(student, chosen, config, *, tokenizer, generator):
        calls.append(len(chosen))
        return gkd.on_policy_examples(student, chosen, config, tokenizer=tokenizer,
                                      generator=generator)
    return sample


def test_student_gets_closer_to_the_teacher(tokenizer, examples, teacher):
    student = build_tiny_model(NARROW, tokenizer)
    held = examples[:16]
    cfg = _config()
    import copy

    before_model = copy.deepcopy(student)
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    from posttrain.data.packing import collate_padded

    batches = [collate_padded(held[i:i + 4], tokenizer.pad_token_id) for i in range(0, 16, 4)]
    before = gkd.evaluate_jsd(before_model, teacher, batches, cfg, acc)["eval_jsd"]
    history, calls = [], []
    final = gkd.train(student, teacher, examples, held, cfg, tokenizer=tokenizer,
                      log_metrics=lambda m, s: history.append(dict(m)),
                      sample=_counting_sampler(calls))
    assert final["eval_jsd"] < 0.7 * before, (before, final["eval_jsd"])
    assert final["eval_loss"] == final["eval_jsd"]
    assert all(math.isfinite(m["loss"]) and m["loss"] == m["jsd"] for m in history)
    assert len(history) == 12
    fractions = [m["on_policy_fraction"] for m in history]
    assert set(fractions) <= {0.0, 1.0} and 0 < len(calls) < 12  # lmbda 0.5: some of each
    assert sum(fractions) == len(calls)
    changed = [n for n, p in student.named_parameters()
               if not torch.equal(p, dict(before_model.named_parameters())[n])]
    assert len(changed) == len(list(student.parameters()))
    # the teacher is frozen and untouched
    assert all(not p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize("lmbda,expected", [(0.0, 0), (1.0, 6)])
def test_lmbda_zero_never_generates_and_one_always_does(tokenizer, examples, teacher,
                                                        lmbda, expected):
    student = build_tiny_model(NARROW, tokenizer)
    calls, history = [], []
    gkd.train(student, teacher, examples, examples[:4], _config(lmbda=lmbda, max_steps=3,
                                                               grad_accum=2),
              tokenizer=tokenizer, sample=_counting_sampler(calls),
              log_metrics=lambda m, s: history.append(dict(m)))
    assert len(calls) == expected and all(c == 4 for c in calls)
    assert [m["on_policy_fraction"] for m in history] == [lmbda] * 3


def test_on_policy_examples_keep_the_prompt_and_label_the_samples(tokenizer, examples,
                                                                  teacher):
    chosen = examples[:3]
    out = gkd.on_policy_examples(teacher, chosen, _config(), tokenizer=tokenizer,
                                 generator=torch.Generator().manual_seed(0))
    for before, after in zip(chosen, out, strict=True):
        p = gkd.prompt_length(before)
        assert after["input_ids"][:p] == before["input_ids"][:p]
        assert after["labels"][:p] == [-100] * p
        assert after["labels"][p:] == after["input_ids"][p:]
        assert 1 <= len(after["input_ids"]) - p <= 12


def test_mismatched_tokenizers_are_refused(tokenizer):
    class Other:
        def get_vocab(self):
            return {**tokenizer.get_vocab(), "<extra>": 10_000}

    with pytest.raises(ValueError, match="teacher: its tokenizer differs"):
        gkd.check_tokenizers(tokenizer, Other())
    gkd.check_tokenizers(tokenizer, tokenizer)


# ------------------------------------------------------------------------------ the stage


def _folder_teacher(path, tokenizer):
    from posttrain.models import save_model

    save_model(build_tiny_model(WIDE, tokenizer), tokenizer, path)
    return str(path)


def _pipeline(tmp_path, teacher: str, **settings):
    from conftest import SMALL, tiny_pipeline_values

    from posttrain.config import PipelineConfig, validate

    gkd_stage = {"name": "gkd", "method": "gkd", "data": "sft", "teacher": teacher, **SMALL,
                 "max_steps": 2, "max_new_tokens": 4, **settings}
    return validate(PipelineConfig, tiny_pipeline_values(tmp_path, [gkd_stage]))


def test_stage_with_a_folder_teacher_trains_and_keys_on_the_folder(tmp_path, tokenizer):
    from posttrain import stages

    folder = _folder_teacher(tmp_path / "teacher", tokenizer)
    cfg = _pipeline(tmp_path, folder, lmbda=1.0)
    manifests = stages.run_all(cfg, ["gkd"])
    gkd_manifest = manifests["gkd"]
    assert gkd_manifest["teacher"] == folder and not gkd_manifest["cached"]
    assert gkd_manifest["metrics"]["on_policy_fraction"] == 1.0
    assert stages.run_all(cfg, ["gkd"])["gkd"]["cached"]
    # other teacher weights in the same folder: another key, the stage trains again
    from posttrain.models import save_model

    save_model(build_tiny_model(WIDE.model_copy(update={"seed": 7}), tokenizer), tokenizer,
               folder)
    again = stages.run_all(cfg, ["gkd"])["gkd"]
    assert not again["cached"] and again["key"] != gkd_manifest["key"]


def test_stage_refuses_a_teacher_with_another_tokenizer(tmp_path, tokenizer):
    from posttrain import stages
    from posttrain.models import build_tiny_tokenizer, save_model

    other = build_tiny_tokenizer()
    other.add_tokens(["<extra-token>"])
    save_model(build_tiny_model(WIDE, tokenizer), other, tmp_path / "teacher")
    cfg = _pipeline(tmp_path, str(tmp_path / "teacher"))
    with pytest.raises(ValueError, match="teacher: its tokenizer differs from the student's"):
        stages.run_all(cfg, ["gkd"])


def test_the_teacher_stage_is_found_when_a_runner_passes_only_start_and_reward(tmp_path):
    """A runner that knows only data/start/reward (the Prefect task) gives the GKD stage the
    same key as the graph runner: the teacher's manifest is looked up, and its digest keys
    the student."""
    from conftest import SFT_STAGE, stage, tiny_pipeline_values

    from posttrain import stages
    from posttrain.config import PipelineConfig, validate
    from posttrain.stages.common import training_key
    from posttrain.stages.graph import with_teacher

    gkd_stage = stage("gkd", start="base")  # teacher: sft
    cfg = validate(PipelineConfig, tiny_pipeline_values(
        tmp_path, [{**SFT_STAGE, "max_steps": 2}, gkd_stage]))
    manifests = stages.run_all(cfg, ["gkd"])
    bare = {"data": manifests["data"], "start": None, "reward": None}
    full = with_teacher(cfg, cfg.stage("gkd"), bare)
    assert full["teacher"]["digest"] == manifests["sft"]["digest"]
    assert training_key(cfg, cfg.stage("gkd"), full) == manifests["gkd"]["key"]
    other = {**full, "teacher": {**full["teacher"], "digest": "another teacher"}}
    assert training_key(cfg, cfg.stage("gkd"), other) != manifests["gkd"]["key"]
    assert stages.run_training_stage(cfg, "gkd", bare)["cached"]
    # the key itself looks the teacher up: the Prefect task's cache key and the plan agree
    assert training_key(cfg, cfg.stage("gkd"), bare) == manifests["gkd"]["key"]
    from posttrain.preflight import plan

    rows = {r.stage: r for r in plan(cfg).rows}
    assert rows["gkd"].status == "cached" and rows["gkd"].key == manifests["gkd"]["key"]
    assert rows["gkd"].uses == "teacher sft"


def test_select_best_names_the_logged_eval_metrics(tokenizer, examples, teacher):
    # eval_jsd's name does not say its direction; eval_loss (the same value) does
    assert _config(select_best="eval_jsd", select_best_mode="min").best_mode == "min"
    with pytest.raises(ValueError, match="needs select_best_mode"):
        _config(select_best="eval_jsd")
    history = []
    with pytest.raises(ValueError, match="select_best: 'eval/reward' is not a metric"):
        _config(select_best="eval/reward")
    cfg = _config(max_steps=4, eval_every=2, lmbda=0.0, select_best="eval_loss")
    final = gkd.train(build_tiny_model(NARROW, tokenizer), teacher, examples, examples[:8], cfg,
                      tokenizer=tokenizer, log_metrics=lambda m, s: history.append(dict(m)))
    logged = {k for m in history for k in m if k.startswith("eval_")}
    assert logged == cfg.eval_metric_names() == {"eval_loss", "eval_jsd"}
    assert final["best_step"] in (2, 4)
