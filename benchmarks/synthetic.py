"""Synthetic data, random-initialised models, work counters and memory readings for the workers.

Token ids: 0 = padding, 2 = EOS, real content ids are drawn from [3, vocab). Lengths follow a
clipped log-normal (right-skewed, like real prompt and completion lengths): its median is the
geometric mean of [lo, hi] and lo/hi sit two standard deviations away, so most examples are
mid-sized and a few are long, the spread that makes padding wasteful.
"""

from __future__ import annotations

import math
import random
import resource
import sys

import torch

PAD_ID = 0
EOS_ID = 2
FIRST_CONTENT_ID = 3


# ----------------------------------------------------------------------------------------- data


def lognormal_lengths(n: int, lo: int, hi: int, rng: random.Random) -> list[int]:
    """`n` integer lengths in [lo, hi] from a log-normal centred on sqrt(lo * hi)."""
    if not 1 <= lo <= hi:
        raise ValueError(f"need 1 <= lo <= hi, got [{lo}, {hi}]")
    mu = (math.log(lo) + math.log(hi)) / 2
    sigma = max((math.log(hi) - math.log(lo)) / 4, 1e-9)
    return [min(hi, max(lo, round(rng.lognormvariate(mu, sigma)))) for _ in range(n)]


def _ids(n: int, vocab: int, rng: random.Random) -> list[int]:
    return [rng.randrange(FIRST_CONTENT_ID, vocab) for _ in range(n)]


def sft_examples(
    n: int, vocab: int, prompt_len: tuple[int, int], completion_len: tuple[int, int], seed: int
) -> list[dict]:
    """Tokenized SFT examples {input_ids, labels}: loss on the completion (+ EOS) only."""
    rng = random.Random(f"sft:{seed}")
    prompts = lognormal_lengths(n, *prompt_len, rng)
    completions = lognormal_lengths(n, *completion_len, rng)
    out = []
    for p, c in zip(prompts, completions):
        prompt, completion = _ids(p, vocab, rng), _ids(c - 1, vocab, rng) + [EOS_ID]
        out.append({"input_ids": prompt + completion, "labels": [-100] * p + completion})
    return out


def preference_pairs(
    n: int, vocab: int, prompt_len: tuple[int, int], completion_len: tuple[int, int], seed: int
) -> list[dict]:
    """Tokenized pairs {prompt_ids, chosen_ids, rejected_ids}, responses of independent lengths."""
    rng = random.Random(f"pairs:{seed}")
    prompts = lognormal_lengths(n, *prompt_len, rng)
    chosen = lognormal_lengths(n, *completion_len, rng)
    rejected = lognormal_lengths(n, *completion_len, rng)
    return [
        {
            "prompt_ids": _ids(p, vocab, rng),
            "chosen_ids": _ids(c - 1, vocab, rng) + [EOS_ID],
            "rejected_ids": _ids(r - 1, vocab, rng) + [EOS_ID],
        }
        for p, c, r in zip(prompts, chosen, rejected)
    ]


def kto_examples(
    n: int, vocab: int, prompt_len: tuple[int, int], completion_len: tuple[int, int], seed: int
) -> list[dict]:
    """Tokenized unpaired rows {prompt_ids, completion_ids, label}, labels alternating."""
    rng = random.Random(f"kto:{seed}")
    prompts = lognormal_lengths(n, *prompt_len, rng)
    completions = lognormal_lengths(n, *completion_len, rng)
    return [
        {
            "prompt_ids": _ids(p, vocab, rng),
            "completion_ids": _ids(c - 1, vocab, rng) + [EOS_ID],
            "label": i % 2 == 0,
        }
        for i, (p, c) in enumerate(zip(prompts, completions))
    ]


def prompt_rows(
    n: int, vocab: int, prompt_len: tuple[int, int], seed: int
) -> list[dict]:
    """Prompt rows {prompt} for GRPO/PPO, as word-level text ("t17 t5 ...", see word_tokenizer)."""
    rng = random.Random(f"prompts:{seed}")
    return [{"prompt": ids_to_text(_ids(p, vocab, rng)).lstrip()}
            for p in lognormal_lengths(n, *prompt_len, rng)]


def ids_to_text(ids: list[int]) -> str:
    """Ids as word-level text, one word per id and a leading space: " t17 t5"."""
    return "".join(f" t{i}" for i in ids)


def word_tokenizer(vocab: int):
    """A fast tokenizer with one word per id ("t17" <-> 17), so text round-trips to our ids.

    Adds no special tokens; pad = 0, EOS = 2, unk = 1 (the synthetic data's conventions).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": PAD_ID, "<unk>": 1, "<eos>": EOS_ID}
    words.update({f"t{i}": i for i in range(FIRST_CONTENT_ID, vocab)})
    backend = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                   eos_token="<eos>", unk_token="<unk>")


def char_count_reward(prompts: list, completions: list[str], **_) -> list[float]:
    """Rule reward for the GRPO benchmark: the completion's length in characters / 100.

    Cheap (no model), deterministic, and it varies within a group (ids print as 2-5 characters),
    so group-normalized advantages are not all zero.
    """
    return [len(c) / 100 for c in completions]


def demo_sft_examples(n: int, max_length: int, seed: int) -> tuple[list[dict], object]:
    """The built-in demo's SFT examples (conversational, char tokenizer): ~10-20 tokens each."""
    from posttrain.config import DemoTaskConfig
    from posttrain.data.demo import generate_sft
    from posttrain.data.tokenize import tokenize_sft_rows
    from posttrain.models import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    rows = generate_sft(DemoTaskConfig(num_train=n, num_eval=50, conversational=True), seed, "train")
    examples, _ = tokenize_sft_rows(rows, tokenizer, max_length=max_length)
    return examples, tokenizer


# --------------------------------------------------------------------------------------- models


def qwen2_config(
    *, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int,
    pad_token_id: int = PAD_ID, eos_token_id: int = EOS_ID,
):
    """A Qwen2 config of any vocabulary size (tied embeddings, like the small Qwen2 models)."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=intermediate,
        max_position_embeddings=4096, tie_word_embeddings=True, pad_token_id=pad_token_id,
        eos_token_id=eos_token_id, bos_token_id=None,
    )


def build_model(config, *, reward: bool, seed: int) -> torch.nn.Module:
    """Random-initialised causal LM, or (reward=True) a one-output sequence classifier."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if reward:
            config.num_labels = 1
            return AutoModelForSequenceClassification.from_config(
                config, attn_implementation="sdpa", dtype=torch.float32
            )
        return AutoModelForCausalLM.from_config(
            config, attn_implementation="sdpa", dtype=torch.float32
        )


# --------------------------------------------------------------------------------- work counting


def count_work(
    model: torch.nn.Module, pad_token_id: int, counts: dict[str, int] | None = None
) -> dict[str, int]:
    """Counters of the work the model does, filled by forward pre-hooks.

    `{grad,nograd}_tokens`: real (non-pad) tokens through the decoder body; `_positions`: all
    positions, padding included; `_head_rows`: rows through the LM head (the recipes run it only
    on positions that carry a loss). "grad" calls run with autograd on (a training forward that
    is followed by a backward), "nograd" ones are reference / KL / precompute forwards.
    The hooks are closures, so `copy.deepcopy(model)` (the 'copy' reference mode) keeps counting
    into the same dict: the reference's forwards are counted as nograd work. Pass `counts` to
    add a second model's work into an existing dict.
    """
    counts = counts if counts is not None else {
        f"{mode}_{what}": 0
        for mode in ("grad", "nograd")
        for what in ("tokens", "positions", "head_rows")
    }

    def on_body(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is None and args:
            ids = args[0]
        mode = "grad" if torch.is_grad_enabled() else "nograd"
        counts[f"{mode}_tokens"] += int((ids != pad_token_id).sum())
        counts[f"{mode}_positions"] += ids.numel()

    def on_head(module, args):
        mode = "grad" if torch.is_grad_enabled() else "nograd"
        counts[f"{mode}_head_rows"] += args[0].shape[:-1].numel()

    model.base_model.register_forward_pre_hook(on_body, with_kwargs=True)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        head.register_forward_pre_hook(on_head)
    return counts


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """total (tied weights once), body (decoder without the embedding table), head (H x V)."""
    body = model.base_model
    embed = body.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "body": sum(p.numel() for p in body.parameters()) - embed,
        "head": head.weight.numel() if head is not None else 0,
    }


def model_flops(counts: dict[str, int], params: dict[str, int]) -> float:
    """Useful model FLOPs: 6 per parameter per token with a backward, 2 without.

    Body parameters are charged per real decoder token, the LM head per row it actually ran on.
    Attention-score FLOPs (quadratic in length) and padding are not counted: this is the work a
    perfect implementation would still have to do, so wasted padding shows up as lower utilisation.
    """
    return (
        6 * params["body"] * counts["grad_tokens"]
        + 2 * params["body"] * counts["nograd_tokens"]
        + 6 * params["head"] * counts["grad_head_rows"]
        + 2 * params["head"] * counts["nograd_head_rows"]
    )


# --------------------------------------------------------------------------------------- memory


def current_rss_mb() -> float:
    """Resident memory now (Linux /proc; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * resource.getpagesize() / 2**20
    except OSError:
        return peak_rss_mb()


def peak_rss_mb() -> float:
    """Peak resident memory of this process (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10
