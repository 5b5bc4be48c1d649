"""Preflight's checks of a pipeline with a vision-language model or image data, before anything
trains: which methods take images, packing refused, images given to a text model refused."""

from __future__ import annotations

from posttrain.config import PipelineConfig

# The offline methods whose recipes pass the rows' images to the model (SFT and the pair
# losses); the reward model, KTO, GKD and the online methods are text-only here.
VISION_METHODS = ("sft", "dpo", "orpo", "simpo", "cpo")


def check_vision(cfg: PipelineConfig, stages: list, datasets: dict, vision: bool) -> list[str]:
    """Problems of the stages (and of the evaluation) with images, or with a vision-language
    model (`vision`); `datasets[name]["images"]` says whether a source holds images."""
    problems = []
    for s in stages:
        where = f"stages.{s.name} ({s.method})"
        if datasets.get(s.data, {}).get("images") and not vision:
            problems.append(
                f"{where}: data.{s.data} holds images, but model.name_or_path "
                f"{cfg.model.name_or_path!r} is a text model; give a vision-language model "
                "(one that AutoModelForImageTextToText loads, or 'tiny-vlm')")
        if not vision:
            continue
        if s.method not in VISION_METHODS:
            problems.append(
                f"{where}: vision-language models train with {', '.join(VISION_METHODS)}; "
                f"{s.method} takes text models only")
        if getattr(s, "packing", False):
            problems.append(
                f"{where}: packing is not supported for vision-language data (a row would hold "
                "several examples' image tokens); set packing: false")
        if getattr(s, "truncation", "drop") not in ("drop", "error"):
            problems.append(
                f"{where}: truncation: {s.truncation} would cut through an image's tokens; "
                "vision-language rows are dropped (truncation: drop) or refused (error)")
        if not getattr(s, "completion_only_loss", True):
            problems.append(
                f"{where}: completion_only_loss: false is not supported for vision-language "
                "data: the loss is on the assistant's text only")
    if vision and cfg.evaluate.enabled and cfg.evaluate.tasks:
        problems.append("evaluate.tasks: the harness tasks run on text models only; leave "
                        "evaluate.tasks empty for a vision-language model")
    return problems
