"""lm-evaluation-harness as an evaluation backend (posttrain/harness.py): metric names, the
offline preflight, the local task's files, and the harness's exact match agreeing with
posttrain's own checker accuracy on the same prompts for an SFT model and a DPO model."""

from __future__ import annotations

import json
import random
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from posttrain import harness, harness_local, harness_preflight
from posttrain.config import DemoTaskConfig, DPOConfig, SFTConfig, TinyModelConfig
from posttrain.data import demo

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ metric names


def test_metric_keys_strip_the_none_filter_and_keep_others():
    assert harness.metric_key("posttrain_demo", "exact_match,none") == \
        "lm_eval/posttrain_demo/exact_match"
    assert harness.metric_key("gsm8k", "exact_match,strict-match") == \
        "lm_eval/gsm8k/exact_match/strict-match"
    assert harness.metric_key("gsm8k", "exact_match_stderr,strict-match") is None
    assert harness.metric_key("gsm8k", "alias") is None
    # characters MLflow refuses in a metric name become "_"
    assert harness.metric_key("ifeval", "prompt_level_strict_acc,a,b") == \
        "lm_eval/ifeval/prompt_level_strict_acc/a_b"


def test_flatten_results_takes_numbers_of_tasks_and_groups():
    out = {
        "results": {
            "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.25,
                      "exact_match_stderr,strict-match": 0.05,
                      "exact_match,flexible-extract": 0.5,
                      "exact_match_stderr,flexible-extract": "N/A"},
            "mmlu_anatomy": {"alias": " - anatomy", "acc,none": 0.4, "acc_stderr,none": 0.1},
        },
        "groups": {"mmlu": {"alias": "mmlu", "acc,none": 0.45, "acc_stderr,none": 0.02}},
    }
    out["higher_is_better"] = {"gsm8k": {"exact_match": True}, "mmlu": {"acc": True},
                               "wikitext": {"word_perplexity": False}}
    metrics, stderrs = harness.flatten_results(out)
    assert harness.directions(out, [*metrics, "lm_eval/wikitext/word_perplexity"]) == {
        "lm_eval/gsm8k/exact_match/strict-match": "max",
        "lm_eval/gsm8k/exact_match/flexible-extract": "max",
        "lm_eval/mmlu/acc": "max", "lm_eval/wikitext/word_perplexity": "min"}
    assert metrics == {
        "lm_eval/gsm8k/exact_match/strict-match": 0.25,
        "lm_eval/gsm8k/exact_match/flexible-extract": 0.5,
        "lm_eval/mmlu_anatomy/acc": 0.4,
        "lm_eval/mmlu/acc": 0.45,
    }
    assert stderrs == {
        "lm_eval/gsm8k/exact_match/strict-match_stderr": 0.05,
        "lm_eval/mmlu_anatomy/acc_stderr": 0.1,
        "lm_eval/mmlu/acc_stderr": 0.02,
    }


# ------------------------------------------------------------------------------ preflight


def _hub_task(folder: Path, name: str = "needs_hub") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: someone/some_dataset\noutput_type: generate_until\n"
        "test_split: test\ndoc_to_text: q\ndoc_to_target: a\n"
        "metric_list:\n  - metric: exact_match\n")
    return folder


def test_check_tasks_names_an_unknown_task():
    problems = harness_preflight.check_tasks(["posttrain_demo", "no_such_task_xyz"])
    assert len(problems) == 1
    assert "'no_such_task_xyz' is unknown" in problems[0]
    assert str(harness_local.LOCAL_TASKS) in problems[0]


def test_check_tasks_offline_refuses_an_uncached_hub_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(harness_preflight, "dataset_cached", lambda repo: False)
    include = _hub_task(tmp_path / "tasks")
    assert harness_preflight.check_tasks(["posttrain_demo"], include_path=include) == []
    (problem,) = harness_preflight.check_tasks(["needs_hub"], include_path=include)
    assert "'needs_hub'" in problem and "'someone/some_dataset'" in problem
    assert "Hugging Face Hub" in problem and "HF_HUB_OFFLINE" in problem
    assert "local task" in problem
    # a cached copy is fine offline
    monkeypatch.setattr(harness_preflight, "dataset_cached", lambda repo: True)
    assert harness_preflight.check_tasks(["needs_hub"], include_path=include) == []


def test_check_tasks_online_says_the_hub_is_unreachable(tmp_path, monkeypatch):
    import huggingface_hub

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    calls = []

    def unreachable(self, repo, **kwargs):
        calls.append(repo)
        raise ConnectionError("no route to host")

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", unreachable)
    monkeypatch.setattr(harness_preflight, "dataset_cached", lambda repo: False)
    include = _hub_task(tmp_path / "tasks")
    _hub_task(include, "needs_hub_too")  # same dataset: asked once
    problems = harness_preflight.check_tasks(["needs_hub", "needs_hub_too"], include_path=include)
    assert len(problems) == 2 and calls == ["someone/some_dataset"]
    assert all("unreachable" in p and "HF_HUB_OFFLINE=1" in p for p in problems)


def test_check_tasks_knows_lm_evals_own_tasks_and_groups(monkeypatch):
    """Real harness configs: gsm8k (one hub dataset) and the mmlu group (57 subtasks, one hub
    dataset): each leaf is named once, offline and uncached."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(harness_preflight, "dataset_cached", lambda repo: False)
    problems = harness_preflight.check_tasks(["gsm8k", "mmlu"])
    gsm = [p for p in problems if "'gsm8k'" in p]
    assert len(gsm) == 1 and "'openai/gsm8k'" in gsm[0]
    mmlu = [p for p in problems if "(in 'mmlu')" in p]
    assert len(mmlu) == 57 and all("'cais/mmlu'" in p for p in mmlu)


def test_dataset_cached_looks_in_the_hub_and_datasets_caches(tmp_path, monkeypatch):
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    assert not harness_preflight.dataset_cached("openai/gsm8k")
    (tmp_path / "hub/datasets--openai--gsm8k/snapshots").mkdir(parents=True)
    assert not harness_preflight.dataset_cached("openai/gsm8k")  # an empty snapshots folder is no copy
    (tmp_path / "hub/datasets--openai--gsm8k/snapshots/abc").mkdir()
    assert harness_preflight.dataset_cached("openai/gsm8k")
    (tmp_path / "datasets/cais___mmlu/all").mkdir(parents=True)
    assert harness_preflight.dataset_cached("cais/mmlu")


def test_run_tasks_fails_in_preflight_before_loading_a_model(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(harness_preflight, "dataset_cached", lambda repo: False)
    include = _hub_task(tmp_path / "tasks")
    with pytest.raises(harness.TaskError, match="needs_hub.*offline mode is on"):
        harness.run_tasks(tmp_path / "no_model_here", ["needs_hub"], include_path=include)


def test_check_tasks_names_a_missing_local_data_file(tmp_path):
    yaml_path = harness_local.write_task(tmp_path, harness_local.task_rows(
        [{"prompt": "1+2=", "completion": " 3"}]))
    (tmp_path / "posttrain_demo.jsonl").unlink()
    (problem,) = harness_preflight.check_tasks(["posttrain_demo"], include_path=yaml_path.parent)
    assert "data file" in problem and "does not exist" in problem


def test_fingerprint_moves_with_the_data_the_config_and_the_settings(tmp_path):
    rows = harness_local.task_rows([{"prompt": "1+2=", "completion": " 3"},
                              {"prompt": "2+2=", "completion": " 4"}])
    folder = harness_local.write_task(tmp_path, rows).parent
    first = harness_preflight.fingerprint(["posttrain_demo"], include_path=folder, limit=None)
    assert harness_preflight.fingerprint(["posttrain_demo"], include_path=folder, limit=None) == first
    assert harness_preflight.fingerprint(["posttrain_demo"], include_path=folder, limit=1) != first
    harness_local.write_task(tmp_path, rows, max_gen_toks=8)  # the YAML changed
    second = harness_preflight.fingerprint(["posttrain_demo"], include_path=folder, limit=None)
    assert second != first
    harness_local.write_task(tmp_path, rows[:1], max_gen_toks=8)  # the JSONL changed
    assert harness_preflight.fingerprint(["posttrain_demo"], include_path=folder, limit=None) != second
    # the same task written elsewhere is the same ground; the shipped one (200 rows) is not
    elsewhere = harness_local.write_task(tmp_path / "elsewhere", rows).parent
    assert harness_preflight.fingerprint(["posttrain_demo"], include_path=elsewhere, limit=None) == first
    assert harness_preflight.fingerprint(["posttrain_demo"], limit=None) != first


# ------------------------------------------------------------------------------ the local task


def test_task_rows_use_the_checkers_answer_and_the_user_turn():
    rows = demo.generate_sft(DemoTaskConfig(num_eval=9, conversational=True), 0, "eval")
    out = harness_local.task_rows(rows, answer=demo.correct_answer)
    assert [r["prompt"] for r in out] == [r["prompt"][0]["content"] for r in rows]
    assert [r["answer"] for r in out] == [demo.correct_answer(r["prompt"]) for r in rows]
    assert [r["task"] for r in out] == [r["task"] for r in rows]
    # without an answer function, the reference completion (stripped) is the target
    plain = demo.generate_sft(DemoTaskConfig(num_eval=3, conversational=False), 0, "eval")
    assert [r["answer"] for r in harness_local.task_rows(plain)] == \
        [r["completion"].strip() for r in plain]
    with pytest.raises(ValueError, match="roles"):
        harness_local.task_rows([{"prompt": [{"role": "user", "content": "a"},
                                       {"role": "assistant", "content": "b"},
                                       {"role": "user", "content": "c"}], "completion": "d"}])


def test_write_task_writes_a_yaml_the_harness_reads_over_the_jsonl(tmp_path):
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.tasks._yaml_loader import load_yaml

    rows = harness_local.task_rows([
        {"prompt": [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "rev abcd"}], "completion": [
            {"role": "assistant", "content": "dcba"}]},
        {"prompt": [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "2+2="}], "completion": [
            {"role": "assistant", "content": "4"}]},
    ])
    yaml_path = harness_local.write_task(tmp_path / "t", rows, name="mine", max_gen_toks=7)
    cfg = load_yaml(yaml_path, resolve_func=True)
    assert cfg["task"] == "mine" and cfg["output_type"] == "generate_until"
    assert cfg["custom_dataset"] is harness_local.load_docs
    assert cfg["description"] == "Be brief."  # the shared system message
    assert cfg["generation_kwargs"] == {"until": [], "do_sample": False, "max_gen_toks": 7}
    assert (cfg["doc_to_text"], cfg["doc_to_target"]) == ("prompt", "answer")
    docs = cfg["custom_dataset"](**cfg["dataset_kwargs"])["test"]
    assert list(docs) == [{"prompt": "rev abcd", "answer": "dcba"},
                          {"prompt": "2+2=", "answer": "4"}]
    # exact match ignores surrounding whitespace only, as demo.check does
    (metric,) = cfg["metric_list"]
    score = exact_match_hf_evaluate(
        predictions=[" dcba\n", "d cba", "4 ", "44"], references=["dcba", "dcba", "4", "4"],
        regexes_to_ignore=metric["regexes_to_ignore"])
    assert score["exact_match"] == 0.5
    with pytest.raises(ValueError, match="different system messages"):
        harness_local.write_task(tmp_path / "u", [dict(rows[0]), {**rows[1], "system": "Other."}])


def test_the_shipped_task_is_conf_demos_held_out_prompts():
    demo_cfg = DemoTaskConfig(**yaml.safe_load((ROOT / "conf/demo.yaml").read_text())["demo"])
    shipped = harness_local.LOCAL_TASKS / "posttrain_demo.jsonl"
    rows = [json.loads(line) for line in shipped.read_text().splitlines()]
    assert rows == harness_local.demo_rows(demo_cfg)
    assert len(rows) == demo_cfg.num_eval
    assert all(demo.check(r["prompt"], r["answer"]) for r in rows)
    cfg = yaml.safe_load((harness_local.LOCAL_TASKS / "posttrain_demo.yaml").read_text()
                         .replace("!function ", ""))
    assert cfg["dataset_kwargs"] == {"data_file": "posttrain_demo.jsonl"}  # next to the YAML
    docs = harness_local.load_docs(**cfg["dataset_kwargs"])["test"]
    assert len(docs) == demo_cfg.num_eval


def test_the_task_folder_is_package_data():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = setuptools["package-data"]["posttrain.harness_tasks"]
    shipped = [p.name for p in harness_local.LOCAL_TASKS.iterdir() if p.suffix in (".yaml", ".jsonl")]
    assert sorted(shipped) == ["posttrain_demo.jsonl", "posttrain_demo.yaml"]
    assert all(any(fnmatch(name, pat) for pat in patterns) for name in shipped)
    assert (harness_local.LOCAL_TASKS / "__init__.py").is_file()  # a package: found by packages.find
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.startswith("lm-eval") for d in deps)


def test_running_the_harness_keeps_the_callers_random_streams(tokenizer, tmp_path,
                                                               monkeypatch, capfd):
    from posttrain.models import build_tiny_model

    monkeypatch.chdir(tmp_path)  # not a git repository: lm-eval's `git describe` is skipped

    model = build_tiny_model(TinyModelConfig(hidden_size=16, intermediate_size=32), tokenizer)
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    result = harness.evaluate_tasks(None, ["posttrain_demo"], model=model, tokenizer=tokenizer,
                                    limit=3, batch_size=3, max_gen_toks=4,
                                    apply_chat_template=True)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert set(result.metrics) == {"lm_eval/posttrain_demo/exact_match"}
    assert result.directions == {"lm_eval/posttrain_demo/exact_match": "max"}
    assert len(result.per_item["lm_eval/posttrain_demo/exact_match"]) == 3
    assert [o["target"] for o in result.outputs["posttrain_demo"]] == \
        [json.loads(line)["answer"] for line in
         (harness_local.LOCAL_TASKS / "posttrain_demo.jsonl").read_text().splitlines()[:3]]
    assert set(result.seconds) == {"posttrain_demo"}
    err = capfd.readouterr().err
    assert "fatal" not in err
    assert "it/s" not in err and "requests" not in err  # no progress bars of lm-eval's


# ------------------------------------------------------------------------------ agreement

_DEMO = DemoTaskConfig(tasks=("add", "sort"), num_train=2000, num_eval=60, conversational=True)


def _checker_accuracy(model, tokenizer, rows, batch_size):
    from posttrain.evaluate import greedy_completions

    completions = greedy_completions(model, tokenizer, [r["prompt"] for r in rows],
                                     max_new_tokens=16, batch_size=batch_size)
    return [float(demo.check(r["prompt"], c["text"])) for r, c in zip(rows, completions)], \
        [c["text"] for c in completions]


def test_harness_exact_match_equals_checker_accuracy_for_sft_and_dpo(tmp_path, tokenizer):
    """Two trained models (SFT, then DPO from it), each saved and loaded back as the
    evaluation stage loads a candidate: the harness's exact match on the local task over the
    held-out rows equals posttrain's checker accuracy on the same rows with the same greedy
    decoding (within 0.02; in fact per prompt)."""
    from posttrain.data.preference import tokenize_preference_rows
    from posttrain.data.tokenize import tokenize_sft_rows
    from posttrain.models import build_tiny_model, save_model
    from posttrain.recipes import preference, sft

    torch.set_num_threads(1)
    pad = tokenizer.pad_token_id
    examples, _ = tokenize_sft_rows(demo.generate_sft(_DEMO, 0, "train"), tokenizer,
                                    max_length=48)
    model = build_tiny_model(TinyModelConfig(hidden_size=32, intermediate_size=64), tokenizer)
    sft.train(model, examples, examples[:8], SFTConfig(
        max_steps=300, per_device_batch_size=16, learning_rate=3e-3, warmup_steps=10,
        max_length=48, eval_every=10**6, log_every=10**6), pad_token_id=pad)
    save_model(model, tokenizer, tmp_path / "sft")
    pairs, _ = tokenize_preference_rows(demo.generate_preference(_DEMO, 0, "train")[:400],
                                        tokenizer, max_length=48)
    preference.train("dpo", model, pairs, pairs[:8], DPOConfig(
        max_steps=30, per_device_batch_size=16, learning_rate=5e-5, warmup_steps=0, beta=0.5,
        eval_every=10**6, log_every=10**6), pad_token_id=pad)
    save_model(model, tokenizer, tmp_path / "dpo")

    held_out = demo.generate_sft(_DEMO, 0, "eval")
    include = harness_local.write_task(tmp_path / "task", harness_local.task_rows(
        held_out, answer=demo.correct_answer)).parent
    accuracy, texts = {}, {}
    for name in ("sft", "dpo"):
        loaded, tok = harness.load_model(tmp_path / name, device="cpu")
        checker, texts[name] = _checker_accuracy(loaded, tok, held_out, batch_size=16)
        result = harness.evaluate_tasks(
            None, [harness_local.DEMO_TASK], model=loaded, tokenizer=tok, include_path=include,
            batch_size=16, max_gen_toks=16, apply_chat_template=True)
        em = result.metrics["lm_eval/posttrain_demo/exact_match"]
        accuracy[name] = sum(checker) / len(checker)
        assert abs(em - accuracy[name]) <= 0.02, (name, em, accuracy[name])
        # the same prompts in the same order, scored the same way, prompt by prompt
        per_item = result.per_item["lm_eval/posttrain_demo/exact_match"]
        assert len(per_item) == len(held_out)
        agree = sum(a == b for a, b in zip(per_item, checker)) / len(checker)
        assert agree >= 0.98, (name, agree)
        responses = [o["response"].strip() for o in result.outputs["posttrain_demo"]]
        assert sum(a == b.strip() for a, b in zip(responses, texts[name])) >= 0.98 * len(texts[name])
    assert 0.2 < accuracy["sft"] < 1.0  # not 0 == 0 nor 1 == 1
    assert 0.2 < accuracy["dpo"] < 1.0
    assert texts["sft"] != texts["dpo"]  # DPO changed the model's answers


@pytest.mark.slow
def test_harness_agrees_with_the_checker_on_plain_text_prompts(tmp_path, tokenizer):
    """Standard (string) prompts without the chat template: the harness tokenizes them as
    posttrain does (tokenizer defaults) and the numbers agree too."""
    from posttrain.data.tokenize import tokenize_sft_rows
    from posttrain.models import build_tiny_model
    from posttrain.recipes import sft

    torch.set_num_threads(1)
    plain = _DEMO.model_copy(update={"conversational": False})
    examples, _ = tokenize_sft_rows(demo.generate_sft(plain, 0, "train"), tokenizer,
                                    max_length=48)
    model = build_tiny_model(TinyModelConfig(hidden_size=32, intermediate_size=64), tokenizer)
    sft.train(model, examples, examples[:8], SFTConfig(
        max_steps=300, per_device_batch_size=16, learning_rate=3e-3, warmup_steps=10,
        max_length=48, eval_every=10**6, log_every=10**6), pad_token_id=tokenizer.pad_token_id)
    held_out = demo.generate_sft(plain, 0, "eval")
    assert isinstance(held_out[0]["prompt"], str)
    include = harness_local.write_task(tmp_path, harness_local.task_rows(
        held_out, answer=demo.correct_answer)).parent
    checker, texts = _checker_accuracy(model, tokenizer, held_out, batch_size=16)
    result = harness.evaluate_tasks(
        None, [harness_local.DEMO_TASK], model=model, tokenizer=tokenizer, include_path=include,
        batch_size=16, max_gen_toks=16, apply_chat_template=False)
    accuracy = sum(checker) / len(checker)
    assert 0.2 < accuracy < 1.0
    assert abs(result.metrics["lm_eval/posttrain_demo/exact_match"] - accuracy) <= 0.02
    responses = [o["response"] for o in result.outputs["posttrain_demo"]]
    assert sum(a == b for a, b in zip(responses, texts)) >= 0.98 * len(texts)
