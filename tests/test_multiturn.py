"""Multi-turn rollouts: tool-call parsing and running (errors and timeouts reach the model, never
the rollout), a scripted episode's tokens and tool_mask, batched episodes whose recorded
log-probs equal a forward over the final conversation, one KV cache across turns, and the
environment settings' errors."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

from posttrain.config import ConfigError, GRPOConfig
from posttrain.demo_tools import CalculatorEnv, calculator
from posttrain.environments import Environment, Step, ToolEnvironment
from posttrain.losses.grpo import grpo_loss
from posttrain.multiturn import (
    Agent,
    Episode,
    Limits,
    Renderer,
    _Cache,
    episode_metrics,
    generate_episodes,
    respond,
)
from posttrain.recipes.grpo import loss_mask
from posttrain.rollout import completion_logps
from posttrain.tools import ToolCall, parse_tool_calls, run_tool
from tests._chat_model import CHATML_TOOLS, build_chat_model


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b


def boom(x: int) -> int:
    """Always fails.

    Args:
        x: Anything.
    """
    raise RuntimeError("kaput")


def sleepy(seconds: float) -> str:
    """Sleeps.

    Args:
        seconds: How long.
    """
    time.sleep(seconds)
    return "awake"


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    folder = build_chat_model(tmp_path_factory.mktemp("chat") / "m", chat_template=CHATML_TOOLS)
    return AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)


# ------------------------------------------------------------------------------ tool calls


def test_tool_calls_parse_and_bad_ones_become_errors():
    text = ('a <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call> b '
            '<tool_call>{"name": "add", "arguments": "{\\"a\\": 3, \\"b\\": 4}"}</tool_call>'
            '<tool_call>{"name": add}</tool_call><tool_call>[1]</tool_call><tool_call>{"na')
    calls, errors = parse_tool_calls(text)
    assert calls == [ToolCall("add", {"a": 1, "b": 2}), ToolCall("add", {"a": 3, "b": 4})]
    assert len(errors) == 3
    assert "not valid JSON" in errors[0]
    assert 'must be {"name"' in errors[1]
    assert "not closed" in errors[2]
    assert parse_tool_calls("no call here") == ([], [])


def test_tools_fail_into_error_texts_within_the_timeout():
    tools = {"add": add, "boom": boom, "sleepy": sleepy}
    assert run_tool(tools, ToolCall("add", {"a": 2, "b": 40}), 1.0).content == "42"
    failed = run_tool(tools, ToolCall("boom", {"x": 1}), 1.0)
    assert failed.error and failed.content == "error: RuntimeError: kaput"
    assert "unknown tool 'nope'" in run_tool(tools, ToolCall("nope", {}), 1.0).content
    bad = run_tool(tools, ToolCall("add", {"a": 1}), 1.0)
    assert bad.error and "bad arguments for add" in bad.content
    t0 = time.perf_counter()
    hung = run_tool(tools, ToolCall("sleepy", {"seconds": 30}), 0.2)
    assert hung.error and hung.content == "error: sleepy timed out after 0.2 s"
    assert time.perf_counter() - t0 < 2.0  # the hung call was abandoned, not waited for


def test_calculator_parses_and_never_evaluates():
    assert calculator("12+30*2") == "72"
    assert calculator("(1+2)*-3") == "-9"
    for text in ("__import__('os')", "2**100", "1+", ""):
        with pytest.raises(ValueError):
            calculator(text)


def test_calculator_env_rewards_the_right_final_sum():
    env = CalculatorEnv()
    first = env.reset({"prompt": "37+45="})
    call = {"role": "assistant", "content": "...", "tool_calls": [{"function": {}}]}
    assert env.step([*first, call]) == Step()
    assert env.step([*first, {"role": "assistant", "content": " 82"}]) == Step(done=True,
                                                                                reward=1.0)
    assert env.step([*first, {"role": "assistant", "content": "72"}]).reward == 0.0


def test_respond_runs_the_calls_and_sends_parse_errors_back():
    episode = Episode([{"role": "user", "content": "2+3="}], 1)
    env = ToolEnvironment()
    call = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'
    replies, done = respond(env, {"add": add}, episode, call, 1.0)
    assert not done and replies == [{"role": "tool", "name": "add", "content": "5"}]
    assert episode.messages[1]["tool_calls"][0]["function"] == {"name": "add",
                                                                "arguments": {"a": 2, "b": 3}}
    replies, done = respond(env, {"add": add}, episode, "<tool_call>{oops</tool_call>", 1.0)
    assert not done and replies[0]["content"].startswith("error: the tool call is not valid")
    replies, done = respond(env, {"add": add}, episode, "5", 1.0)
    assert done and replies == []
    assert (episode.tool_calls, episode.parse_failures, episode.tool_errors) == (1, 1, 0)
    assert episode_metrics([episode])["episodes/tool_call_parse_failure_rate"] == 0.5


# --------------------------------------------------------------------- a scripted episode


class ScriptedLM(torch.nn.Module):
    """A causal LM that writes a fixed token script, one token per forward (one row), and
    records the width of every forward: what the rollout encodes."""

    def __init__(self, script: list[int], vocab: int):
        super().__init__()
        self.config = Qwen2Config(vocab_size=vocab, hidden_size=8, num_hidden_layers=1,
                                  num_attention_heads=1, num_key_value_heads=1)
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.script, self.vocab, self.widths = script, vocab, []

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None,
                logits_to_keep=0, past_key_values=None):
        self.widths.append(input_ids.shape[1])
        logits = torch.full((1, 1, self.vocab), -30.0)
        logits[0, 0, self.script.pop(0)] = 30.0
        return type("Out", (), {"logits": logits})()


def test_scripted_episode_masks_exactly_the_tool_result(chat):
    """The model calls add(2, 3), reads 5, answers 5: the sequence is the chat template's
    rendering of that conversation, tool_mask is 0 on exactly the tool result and the next
    generation prompt, and the loss mask (so the loss and the KL) follows it."""
    tok, _ = chat
    end = tok.convert_tokens_to_ids("<|im_end|>")
    call = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'
    turn1 = tok(call, add_special_tokens=False)["input_ids"] + [end]
    turn2 = tok("5", add_special_tokens=False)["input_ids"] + [end]
    model = ScriptedLM(turn1 + turn2, len(tok))
    rollout = generate_episodes(
        model, tok, [{"prompt": "2+3="}], ToolEnvironment, tools=[add], limits=Limits(max_turn_tokens=64),
        temperature=0.0, eos_token_ids={end}, pad_token_id=tok.pad_token_id)
    episode = rollout.episodes[0]
    assert episode.done and not episode.truncated and episode.turns == 2
    assert [m["role"] for m in episode.completion] == ["assistant", "tool", "assistant"]
    assert episode.final_answer == "5" and episode.tool_calls == 1

    obs = Renderer(tok, [add]).observation_ids([episode.completion[1]], end)
    assert tok.decode(obs) == ("\n<|im_start|>user\n<tool_response>\n5\n</tool_response>\n"
                               "<|im_end|>\n<|im_start|>assistant\n")
    ids = rollout.completion_ids[0].tolist()
    assert ids == turn1 + obs + turn2
    assert rollout.tool_mask[0].tolist() == [1] * len(turn1) + [0] * len(obs) + [1] * len(turn2)
    # The whole sequence is what the template renders for the conversation (+ its last "\n").
    schema = Renderer(tok, [add]).schemas
    text = tok.decode(rollout.prompt_ids[0].tolist() + ids) + "\n"
    assert text == tok.apply_chat_template(episode.messages, tools=schema, tokenize=False)
    # The observation was encoded once: one forward over [last token of turn 1 + observation].
    assert model.widths.count(1 + len(obs)) == 1 and sum(model.widths) == \
        rollout.prompt_ids.shape[1] + len(ids) - 1

    cfg = GRPOConfig(per_device_batch_size=2, num_generations=2, max_length=512)
    mask = loss_mask(rollout, cfg)
    assert torch.equal(mask, rollout.tool_mask)
    logps = torch.zeros(1, len(ids), requires_grad=True)
    loss, _ = grpo_loss(logps, logps.detach(), torch.ones(1), mask, beta=0.1,
                        ref_logps=torch.full((1, len(ids)), -1.0))
    loss.backward()
    assert (logps.grad[0][mask[0] == 0] == 0).all() and (logps.grad[0][mask[0] == 1] != 0).all()


def test_a_hanging_or_failing_tool_never_stops_the_episode(chat):
    """The model calls a tool that hangs for 30 s and one that raises, then answers: the
    episode goes on after 0.2 s with both errors shown to the model, and ends normally."""
    tok, _ = chat
    end = tok.convert_tokens_to_ids("<|im_end|>")
    calls = ('<tool_call>{"name": "sleepy", "arguments": {"seconds": 30}}</tool_call>'
             '<tool_call>{"name": "boom", "arguments": {"x": 1}}</tool_call>')
    script = tok(calls, add_special_tokens=False)["input_ids"] + [end]
    script += tok("ok", add_special_tokens=False)["input_ids"] + [end]
    t0 = time.perf_counter()
    rollout = generate_episodes(
        ScriptedLM(script, len(tok)), tok, [{"prompt": "hi"}], ToolEnvironment,
        tools=[sleepy, boom], limits=Limits(max_turn_tokens=128, max_episode_tokens=400,
                                            tool_timeout=0.2),
        temperature=0.0, eos_token_ids={end}, pad_token_id=tok.pad_token_id)
    assert time.perf_counter() - t0 < 5.0
    episode = rollout.episodes[0]
    assert episode.done and episode.final_answer == "ok"
    assert (episode.tool_calls, episode.tool_errors) == (2, 2)
    assert [m["content"] for m in episode.completion if m["role"] == "tool"] == [
        "error: sleepy timed out after 0.2 s", "error: RuntimeError: kaput"]


# --------------------------------------------------------------------- batched episodes


class Chatty(Environment):
    """Replies "more" after each turn; row `turns` says after how many turns it is done."""

    def reset(self, row):
        self.turns = row["turns"]
        return [{"role": "user", "content": row["prompt"]}]

    def step(self, messages):
        n = sum(m["role"] == "assistant" for m in messages)
        return Step([{"role": "user", "content": "more"}], done=n >= self.turns,
                    reward=float(n))


def test_batched_episodes_drop_out_and_their_logps_equal_one_forward(chat, monkeypatch):
    """Episodes of 1, 2 and 3 turns, 3 samples each, at temperature 0.8: the batch shrinks as
    they end, each turn starts with one forward over the appended tokens only, and the
    log-probs recorded while sampling equal one forward over the final conversations."""
    tok, model = chat
    batches = []
    real_feed = _Cache.feed

    def feed(self, ids, mask):
        batches.append(tuple(ids.shape))
        return real_feed(self, ids, mask)

    monkeypatch.setattr(_Cache, "feed", feed)
    rows = [{"prompt": "hello", "turns": 1}, {"prompt": "What is the capital", "turns": 2},
            {"prompt": "Translate", "turns": 3}]
    stops = {tok.convert_tokens_to_ids("<|im_end|>"), *range(3, 150)}  # turns end soon
    rollout = generate_episodes(
        model, tok, rows, Chatty, num_samples=3,
        limits=Limits(max_turns=3, max_turn_tokens=8, max_episode_tokens=120),
        temperature=0.8, eos_token_ids=stops, pad_token_id=tok.pad_token_id,
        generator=torch.Generator().manual_seed(0))
    turns = [e.turns for e in rollout.episodes]
    assert turns == [1, 1, 1, 2, 2, 2, 3, 3, 3], turns
    assert [e.reward for e in rollout.episodes] == [1.0] * 3 + [3.0] * 3 + [6.0] * 3
    prefills = [b for b in batches if b[1] > 1]
    assert [rows for rows, _ in prefills] == [9, 6, 3]  # done episodes left the batch
    # A later turn's one forward is [the last sampled token + the longest observation]: each
    # observation is encoded once, the conversation before it never again.
    runs = [_zero_runs(m) for m in rollout.tool_mask.tolist()]
    for t, (_, width) in enumerate(prefills[1:]):
        assert width == 1 + max(r[t] for r in runs if len(r) > t)

    with torch.no_grad():
        fast = completion_logps(model, rollout.prompt_ids, rollout.prompt_mask,
                                rollout.completion_ids, rollout.completion_mask,
                                temperature=0.8)
        ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], 1)
        attention = torch.cat([rollout.prompt_mask, rollout.completion_mask], 1)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=attention, position_ids=positions).logits
    simple = torch.log_softmax(logits[:, :-1].float() / 0.8, -1).gather(
        -1, ids[:, 1:, None]).squeeze(-1)[:, rollout.prompt_ids.shape[1] - 1:]
    own = rollout.model_mask.bool()
    assert (rollout.tool_mask == 0).logical_and(rollout.completion_mask == 1).any()
    assert (rollout.logps[own] - simple[own]).abs().max() < 1e-4
    assert (rollout.logps[own] - fast[own]).abs().max() < 1e-4
    assert (rollout.logps[~own] == 0).all()


def _zero_runs(mask: list[int]) -> list[int]:
    """Lengths of the runs of 0 (observations) between runs of 1 (model turns)."""
    runs, current = [], 0
    for m in mask:
        if m == 0:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    return runs


def test_limits_end_episodes_as_truncated(chat):
    tok, model = chat
    stops = {tok.convert_tokens_to_ids("<|im_end|>"), *range(3, 150)}
    rows = [{"prompt": "hello", "turns": 5}]
    rollout = generate_episodes(
        model, tok, rows, Chatty, num_samples=4,
        limits=Limits(max_turns=2, max_turn_tokens=8, max_episode_tokens=200),
        temperature=1.0, eos_token_ids=stops, pad_token_id=tok.pad_token_id,
        generator=torch.Generator().manual_seed(1))
    assert all(e.truncated and e.turns <= 2 for e in rollout.episodes)
    assert rollout.truncated.all()
    tight = generate_episodes(
        model, tok, rows, Chatty, num_samples=4,
        limits=Limits(max_turns=5, max_turn_tokens=8, max_episode_tokens=12),
        temperature=1.0, eos_token_ids=stops, pad_token_id=tok.pad_token_id,
        generator=torch.Generator().manual_seed(1))
    assert (tight.completion_mask.sum(-1) <= 12).all()
    assert all(e.truncated for e in tight.episodes)


# ----------------------------------------------------------------------------- settings


def test_environment_settings_errors_name_the_field():
    with pytest.raises(ValueError, match="not a dotted path"):
        GRPOConfig(per_device_batch_size=8, environment={"path": "no dots here"})
    with pytest.raises(ValueError, match="max_episode_tokens .* must leave room"):
        GRPOConfig(per_device_batch_size=8, max_length=64,
                   environment={"max_episode_tokens": 64})
    cfg = GRPOConfig(per_device_batch_size=8, environment={"path": "posttrain.nope:Env"})
    with pytest.raises(ValueError, match="environment.path: cannot import module 'posttrain.nope'"):
        Agent.from_config(cfg.environment, 8, cfg.max_length)
    cfg = GRPOConfig(per_device_batch_size=8,
                     environment={"tools": ["posttrain.demo_tools:CalculatorEnv.step"]})
    with pytest.raises(ValueError, match="environment.tools: .* cannot build its JSON schema"):
        Agent.from_config(cfg.environment, 8, cfg.max_length)
    agent = Agent.from_config(GRPOConfig(
        per_device_batch_size=8,
        environment={"path": "posttrain.demo_tools:CalculatorEnv"}).environment, 8, 300)
    assert agent.make_env is CalculatorEnv and agent.limits.max_prompt_tokens == 236


def test_a_stage_with_an_environment_needs_no_reward_functions():
    from posttrain.config import PipelineConfig, validate

    values = {"data": {"prompts": {"path": "demo:prompts"}},
              "stages": [{"name": "g", "method": "grpo", "data": "prompts",
                          "per_device_batch_size": 8}]}
    with pytest.raises(ConfigError, match="reward_functions: name at least one"):
        validate(PipelineConfig, values)
    values["stages"][0]["environment"] = {"path": "posttrain.demo_tools:CalculatorEnv"}
    assert validate(PipelineConfig, values).stages[0].environment.max_turns == 4


def test_posttrain_plan_names_a_bad_environment_or_tool(tmp_path):
    """Preflight imports the environment and the tools and builds their schemas: each bad
    path is reported with its field before anything trains."""
    from pathlib import Path

    from posttrain.config import load_pipeline_config
    from posttrain.preflight import PreflightError, plan

    root = Path(__file__).resolve().parents[1]
    cfg = load_pipeline_config(root / "conf/examples/agentic.yaml", [
        "demo.num_train=300", "demo.num_eval=20", f"artifacts_root={tmp_path}",
        "stages.grpo.environment.path=posttrain.nope:Env",
        "stages.grpo.environment.tools=[tests.test_multiturn:untyped_tool]"])
    with pytest.raises(PreflightError) as error:
        plan(cfg)
    text = str(error.value)
    assert "stages.grpo.environment.path: cannot import module 'posttrain.nope'" in text
    assert "stages.grpo.environment.tools: 'tests.test_multiturn:untyped_tool'" in text
    assert "cannot build its JSON schema" in text


def untyped_tool(x):  # no type hint, no docstring: no schema a chat template could render
    return x


def test_select_best_may_pick_an_episode_metric():
    cfg = GRPOConfig(per_device_batch_size=8, select_best="eval/rewards/environment/mean",
                     environment={"path": "posttrain.demo_tools:CalculatorEnv"})
    assert cfg.best_mode == "max"
    with pytest.raises(ValueError, match="eval/rewards/environment/mean"):
        GRPOConfig(per_device_batch_size=8, select_best="eval/rewards/environment/mean",
                   reward_functions={"posttrain.reward_functions:demo_checker": 1.0})
