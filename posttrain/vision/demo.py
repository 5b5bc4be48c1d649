"""The built-in image task: name the colour of the square, with a planted systematic mistake.

Each image (deterministic from the seed) is a noisy dark background with one square of a random
size and place, in one of COLOURS; the prompt is the same question for every image, so only the
image tells the answer (a text-only model is right 1 time in 5 at best). As in the text demo
(posttrain/data/demo.py), one region of the task carries a mistake in a share `bug_rate` of the
SFT demonstrations: yellow squares are called "green". Above 0.5 the SFT model learns the
mistake, and DPO's pairs (the right colour chosen over the buggy one) leave it room to fix it.
Held-out rows are always right and carry the answer in an `answer` column, which `check` reads.
"""

from __future__ import annotations

import random
from typing import Any, Literal

from posttrain.config import VisionDemoConfig

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230),
           "yellow": (230, 220, 40), "purple": (150, 50, 200)}
BUG_COLOUR, BUGGY_ANSWER = "yellow", "green"
QUESTION = "What colour is the square?"
Split = Literal["train", "eval"]


def check(answer: str, completion: str) -> bool:
    """Whether a completion names the right colour (case and surrounding space ignored)."""
    return completion.strip().lower() == answer


def _image(rng: random.Random, colour: str, size: int):
    from PIL import Image

    pixels = bytes(rng.randrange(0, 60) for _ in range(size * size * 3))
    image = Image.frombytes("RGB", (size, size), pixels)
    side = rng.randrange(size // 4, size // 2 + 1)
    x, y = rng.randrange(0, size - side + 1), rng.randrange(0, size - side + 1)
    image.paste(COLOURS[colour], (x, y, x + side, y + side))
    return image


def _examples(cfg: VisionDemoConfig, split: Split) -> list[tuple[Any, str]]:
    """(image, colour) pairs; train and eval come from different seeds."""
    rng = random.Random(f"{cfg.seed}-{split}")
    n = cfg.num_train if split == "train" else cfg.num_eval
    colours = list(COLOURS)
    return [(_image(rng, colour := rng.choice(colours), cfg.image_size), colour)
            for _ in range(n)]


def _prompt() -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]


def _reply(text: str) -> list[dict]:
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


def generate_sft(cfg: VisionDemoConfig, split: Split) -> list[dict]:
    """Prompt-completion rows with one image each; in train, `bug_rate` of the yellow squares'
    demonstrations say "green"."""
    rng = random.Random(f"{cfg.seed}-{split}-bugs")
    rows = []
    for image, colour in _examples(cfg, split):
        said = colour
        if split == "train" and colour == BUG_COLOUR and rng.random() < cfg.bug_rate:
            said = BUGGY_ANSWER
        rows.append({"prompt": _prompt(), "completion": _reply(said), "images": [image],
                     "answer": colour})
    return rows


def generate_preference(cfg: VisionDemoConfig, split: Split) -> list[dict]:
    """Pairs: the right colour chosen; rejected the buggy answer for yellow squares, else another
    colour at random."""
    rng = random.Random(f"{cfg.seed}-{split}-pairs")
    rows = []
    for image, colour in _examples(cfg, split):
        wrong = BUGGY_ANSWER if colour == BUG_COLOUR else \
            rng.choice([c for c in COLOURS if c != colour])
        rows.append({"prompt": _prompt(), "chosen": _reply(colour), "rejected": _reply(wrong),
                     "images": [image], "answer": colour})
    return rows
