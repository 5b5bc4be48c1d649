"""Multi-turn rollouts: batched episodes of model turns, tool calls and environment replies.

An episode's tokens are prompt + [model turn + observation]*: the model writes a turn (up to a
stop token), the rollout parses its tool calls and runs them (posttrain/tools.py), the
environment answers (posttrain/environments.py), and the observation, i.e. what the chat
template renders for those messages plus the next generation prompt, is appended before the
model's next turn. The result is a `Rollout` whose completion holds every token after the
prompt and whose `tool_mask` is 1 on the tokens the model wrote and 0 on observation tokens:
GRPO and RLOO put their loss and KL on completion_mask · tool_mask only (as TRL's tool_mask).

Batched with one KV cache across turns (a transformers `DynamicCache`, i.e. the "loop" decoding
path of posttrain/rollout.py): each turn starts with one forward over the appended tokens only,
the previous turn's last sampled token and the left-padded observation (never the whole
conversation again), then one forward per new token. Episodes that end drop out of the batch
(`DynamicCache.batch_select_indices`). The padding inside a row (the pad steps of rows that
stopped early, an observation's left padding) is masked and skipped by the positions, which
come from the attention mask, so the recorded log-probs equal one forward over the final,
unpadded conversation (tested), and `completion_logps` over the Rollout is that forward.

How observations become tokens: the chat template renders a fixed two-message conversation
(user, assistant) with and without the new messages and the generation prompt; the text it adds
is the observation, after the template's own end of the assistant turn minus the stop token the
model already wrote. So observation tokens are exactly the template's, and the model's own
tokens are never re-tokenized. A template that does not render a longer conversation as a
prefix extension of the shorter one is refused.

Limits: `max_turns` model turns, `max_turn_tokens` per turn, `max_episode_tokens` after the
prompt (model and observation tokens). A turn that ends without a stop token, a turn limit
reached with the environment still going, or an observation that would not fit ends the
episode as truncated. Sampling is rollout.py's (Gumbel-max with the global batch's noise, so a
seed gives the same episodes however the batch is sharded over processes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from posttrain.decoding import cache_kwarg
from posttrain.environments import (
    Environment,
    Episode,
    Renderer,
    episode_metrics,
    episode_table,
    load_environment,
    respond,
)
from posttrain.logprobs import position_ids_from_mask
from posttrain.rollout import Rollout, _next_tokens, _row_noise, left_pad
from posttrain.tools import load_tool, tools_by_name


@dataclass
class Limits:
    max_turns: int = 4
    max_turn_tokens: int = 32
    max_episode_tokens: int = 256
    tool_timeout: float = 10.0
    max_prompt_tokens: int | None = None


# ----------------------------------------------------------------------------- decoding


class _Cache:
    """The batch's KV cache and attention mask (A, L) over the rows still in play."""

    def __init__(self, model):
        self.model, self.kwarg = model, cache_kwarg(model)
        self.cache = DynamicCache(config=model.config)
        self.attention: torch.Tensor | None = None
        self.fed: list[int] = []  # widths of the forwards (tests: nothing is encoded twice)

    def feed(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # (A, W) -> (A, V)
        self.attention = mask if self.attention is None else torch.cat(
            [self.attention, mask], dim=1)
        self.fed.append(ids.shape[1])
        out = self.model(input_ids=ids, attention_mask=self.attention,
                         position_ids=position_ids_from_mask(self.attention)[:, -ids.shape[1]:],
                         use_cache=True, logits_to_keep=1, **{self.kwarg: self.cache})
        return out.logits[:, -1].float()

    def keep(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)
        self.attention = self.attention[rows]


def _turn(cache: _Cache, logits, budgets: torch.Tensor, sample, eos, pad_token_id):
    """One model turn of every row in play: (tokens, logps, masks) each (A, T), whether each
    row stopped, and the last column (tokens, mask), which is not in the cache yet."""
    n = budgets.shape[0]
    stopped = torch.zeros(n, dtype=torch.bool, device=budgets.device)
    ended = budgets <= 0
    tokens, logps, masks = [], [], []
    for i in range(int(budgets.max())):
        token, logp = sample(logits)
        alive = ~ended
        tokens.append(torch.where(alive, token, pad_token_id))
        logps.append(torch.where(alive, logp, 0.0))
        masks.append(alive.long())
        stopped = stopped | (alive & torch.isin(token, eos))
        ended = ended | stopped | (budgets <= i + 1)
        if bool(ended.all()):
            break
        logits = cache.feed(tokens[-1][:, None], masks[-1][:, None])
    return (torch.stack(tokens, 1), torch.stack(logps, 1), torch.stack(masks, 1), stopped,
            (tokens[-1], masks[-1]))


@dataclass
class _Stream:
    """The tokens after an episode's prompt: ids, 1 where the model wrote them, log-probs."""

    ids: list[int] = field(default_factory=list)
    tool_mask: list[int] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)

    def add(self, ids: list[int], model: bool, logps: list[float] | None = None) -> None:
        self.ids += ids
        self.tool_mask += [int(model)] * len(ids)
        self.logps += logps if logps is not None else [0.0] * len(ids)


@torch.no_grad()
def generate_episodes(
    model: torch.nn.Module,
    tokenizer,
    rows: list[dict],
    make_env: Callable[[], object],
    *,
    tools: Sequence[Callable] = (),
    num_samples: int = 1,
    limits: Limits,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_token_ids: set[int],
    pad_token_id: int,
    generator: torch.Generator | None = None,
    prompt_offset: int = 0,
    global_prompts: int | None = None,
) -> Rollout:
    """`num_samples` episodes of every row, rows i·G + g as `generate`, batched over all of
    them; the Rollout's `episodes` hold the conversations and their counts."""
    device = next(model.parameters()).device
    envs = [make_env() for _ in rows for _ in range(num_samples)]
    episodes, renderers, toolsets, prompts = [], [], [], []
    for k, env in enumerate(envs):
        first = env.reset(rows[k // num_samples])
        own = list(getattr(env, "tools", ()) or ())
        toolsets.append(tools_by_name([*own, *tools]))
        renderers.append(Renderer(tokenizer, list(toolsets[-1].values())))
        episodes.append(Episode([dict(m) for m in first], len(first)))
        prompts.append(renderers[-1].prompt_ids(episodes[-1].messages))
        if limits.max_prompt_tokens and len(prompts[-1]) > limits.max_prompt_tokens:
            raise ValueError(f"row {prompt_offset + k // num_samples}: its first messages are "
                             f"{len(prompts[-1])} tokens, more than the {limits.max_prompt_tokens} "
                             "max_length leaves after environment.max_episode_tokens")
    total = (len(rows) if global_prompts is None else global_prompts) * num_samples
    start = prompt_offset * num_samples
    draw = _row_noise(slice(start, start + len(envs)), total, device, generator)
    eos = torch.tensor(sorted(eos_token_ids), device=device)
    streams = [_Stream() for _ in envs]
    was_training = model.training
    model.eval()
    try:
        _play(model, tokenizer, envs, episodes, renderers, toolsets, prompts, streams, limits,
              lambda active: lambda logits: _next_tokens(
                  logits, temperature, top_k, top_p, lambda v: draw(v)[active]),
              eos, pad_token_id, device)
    finally:
        model.train(was_training)
    return _as_rollout(prompts, streams, episodes, pad_token_id, device)


def _play(model, tokenizer, envs, episodes, renderers, toolsets, prompts, streams, limits,
          sampler, eos, pad_token_id, device) -> None:
    """The turn loop: decode a turn for the rows in play, answer it, append the observations,
    drop the rows whose episode ended."""
    cache = _Cache(model)
    active = list(range(len(envs)))
    ids, mask = left_pad(prompts, pad_token_id, device)
    while active:
        logits = cache.feed(ids, mask)
        used = torch.tensor([len(streams[k].ids) for k in active], device=device)
        budgets = (limits.max_episode_tokens - used).clamp(max=limits.max_turn_tokens)
        rows = torch.tensor(active, device=device)
        tokens, logps, masks, stopped, last = _turn(cache, logits, budgets, sampler(rows), eos,
                                                    pad_token_id)
        going, observations = [], []
        for j, k in enumerate(active):
            keep = masks[j].bool()
            own = tokens[j][keep].tolist()
            streams[k].add(own, True, logps[j][keep].tolist())
            obs = _after_turn(tokenizer, envs[k], episodes[k], renderers[k], toolsets[k],
                              own, bool(stopped[j]), len(streams[k].ids), limits)
            if obs is not None:
                streams[k].add(obs, False)
                going.append(j)
                observations.append(obs)
        if not going:
            return
        keep = torch.tensor(going, device=device)
        cache.keep(keep)
        active = [active[j] for j in going]
        obs_ids, obs_mask = left_pad(observations, pad_token_id, device)
        # The previous turn's last token (a stop token, or masked padding) goes in first.
        ids = torch.cat([last[0][keep][:, None], obs_ids], dim=1)
        mask = torch.cat([last[1][keep][:, None], obs_mask], dim=1)


def _after_turn(tokenizer, env, episode: Episode, renderer: Renderer, tools, own: list[int],
                stopped: bool, used: int, limits: Limits) -> list[int] | None:
    """The observation ids that continue the episode after the model's turn `own`, or None
    when the episode ends here (done, truncated or out of turns)."""
    episode.turns += 1
    if not stopped:  # out of tokens mid-turn
        text = tokenizer.decode(own, skip_special_tokens=True)
        episode.messages.append({"role": "assistant", "content": text})
        episode.truncated = True
        return None
    text = tokenizer.decode(own[:-1], skip_special_tokens=True)
    replies, done = respond(env, tools, episode, text, limits.tool_timeout)
    if done:
        episode.done = True
        return None
    if episode.turns >= limits.max_turns:
        episode.truncated = True
        return None
    obs = renderer.observation_ids(replies, own[-1])
    if used + len(obs) + 1 > limits.max_episode_tokens:  # no room for the model to answer
        episode.truncated = True
        return None
    return obs


def _as_rollout(prompts, streams, episodes, pad_token_id, device) -> Rollout:
    prompt, prompt_mask = left_pad(prompts, pad_token_id, device)
    width = max(len(s.ids) for s in streams)

    def padded(values, fill, dtype):
        return torch.tensor([v + [fill] * (width - len(v)) for v in values], dtype=dtype,
                            device=device)

    completion_mask = padded([[1] * len(s.ids) for s in streams], 0, torch.long)
    return Rollout(
        prompt_ids=prompt, prompt_mask=prompt_mask,
        completion_ids=padded([s.ids for s in streams], pad_token_id, torch.long),
        completion_mask=completion_mask,
        logps=padded([s.logps for s in streams], 0.0, torch.float32),
        truncated=torch.tensor([e.truncated for e in episodes], device=device),
        lengths=completion_mask.sum(-1),
        tool_mask=padded([s.tool_mask for s in streams], 0, torch.long),
        episodes=episodes,
    )


@dataclass
class Agent:
    """What a stage's `environment` settings load to: the environment factory, the configured
    tools, the limits, the weight of the environment's reward, the table size."""

    make_env: Callable[[], object]
    tools: list[Callable]
    limits: Limits
    reward_weight: float = 1.0
    sample_episodes: int = 0

    @classmethod
    def from_config(cls, env, max_turn_tokens: int, max_length: int) -> Agent | None:
        """The Agent of an EnvironmentConfig (None: None), every dotted path loaded now so that
        a bad one fails before training, naming its field."""
        if env is None:
            return None
        limits = Limits(max_turns=env.max_turns, max_turn_tokens=max_turn_tokens,
                        max_episode_tokens=env.max_episode_tokens, tool_timeout=env.tool_timeout,
                        max_prompt_tokens=max_length - env.max_episode_tokens)
        return cls(load_environment(env.path), [load_tool(t) for t in env.tools], limits,
                   env.reward_weight, env.sample_episodes)


def agent_problems(env) -> list[str]:
    """Every problem of an EnvironmentConfig's dotted paths (the environment, each tool and its
    schema), each naming its field; [] when all load."""
    checks = [lambda: load_environment(env.path)] + [lambda t=t: load_tool(t) for t in env.tools]
    out = []
    for check in checks:
        try:
            check()
        except ValueError as exc:
            out.append(str(exc))
    return out


__all__ = [
    "Agent",
    "Environment",
    "Episode",
    "Limits",
    "Renderer",
    "agent_problems",
    "episode_metrics",
    "episode_table",
    "generate_episodes",
    "respond",
]
