"""Preflight: everything that can be checked without training, checked before anything trains.

`plan(cfg)` loads and validates every data source the stages read (the same code as the data
stage), checks the base model, the reward functions, the batch sizes against the data, and the
metrics evaluation and promotion will read; it returns the graph with each stage's key and
whether it is cached, or raises PreflightError listing every problem found. `posttrain plan`
prints it; `posttrain run` and the stage commands run it first, so a mistake costs seconds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from posttrain import artifacts, disk
from posttrain.config import ConfigError, GroupRolloutConfig, PipelineConfig
from posttrain.data.formats import eval_rows, prompt_rows
from posttrain.data.loading import DataError, fingerprint_rows
from posttrain.data.tokenize import tokenize_sft_rows
from posttrain.data.validation import UNPAIRED_PREFERENCE
from posttrain.methods import is_policy, method, uses_reference
from posttrain.promotion import resolve
from posttrain.stages.common import training_key
from posttrain.stages.data import checker_of, data_stage_key, load_dataset, sources
from posttrain.stages.evaluate import eval_stage_key, evaluation_metrics
from posttrain.stages.evaluate_harness import check_harness
from posttrain.stages.graph import candidates, needed
from posttrain.vision.checks import check_vision
from posttrain.vision.images import has_images
from posttrain.vision.models import TINY_VLM, is_vision_model, load_processor

# Lazy imports: torch (data.preference, data.packing, models, reward_functions) loads only
# for the checks that tokenize or build a model; `posttrain plan` starts without it.

# Counting batches needs the stage's tokenization. A sample of this many rows is tokenized
# first; only when the estimate from it comes within 2x of one batch is the whole source
# tokenized, so a big dataset costs a second here and a small one is counted exactly.
_SAMPLE = 256
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


class PreflightError(ValueError):
    """Problems found before training; the message lists every one of them."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("preflight found problems:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass
class PlanRow:
    stage: str
    method: str
    start: str
    data: str
    uses: str
    status: str  # "cached", "will run"
    key: str | None


@dataclass
class Plan:
    rows: list[PlanRow] = field(default_factory=list)
    formats: dict[str, str] = field(default_factory=dict)
    image_sources: set[str] = field(default_factory=set)  # the sources whose rows have images
    promotion: dict | None = None
    available_metrics: set[str] = field(default_factory=set)


def plan(cfg: PipelineConfig, targets: list[str] | None = None) -> Plan:
    """Check `cfg` (for the stages `targets` needs; None: the whole pipeline) and return its
    plan; PreflightError with every problem otherwise."""
    problems = check_model(cfg) + check_launch(cfg)
    tokenizer = None
    if not problems and cfg.stages:
        tokenizer, problems = _tokenizer(cfg)
    datasets: dict[str, dict] = {}
    rows: dict[str, tuple[list, list]] = {}
    for name, src in sources(cfg).items():
        try:
            train, held, fmt, _ = load_dataset(cfg, name, src)
        except DataError as e:
            problems.append(str(e))
            continue
        rows[name] = (train, held)
        datasets[name] = {"format": fmt, "fingerprint": fingerprint_rows(train + held),
                          "checker": checker_of(src), "images": has_images(train)}
    stages = needed(cfg, targets)
    if problems:  # the model or the data is unusable: the checks below would only add noise
        raise PreflightError(problems)
    vision = is_vision_model(cfg.model)
    problems += check_vision(cfg, stages, datasets, vision)
    if not vision:  # a VLM's rows are counted by its own tokenization, in the stage
        problems += _check_stages(cfg, stages, datasets, rows, tokenizer)
    result = Plan(formats={n: d["format"] for n, d in datasets.items()},
                  image_sources={n for n, d in datasets.items() if d["images"]})
    if targets is None and cfg.evaluate.enabled:
        problems += _check_evaluation(cfg, datasets, rows, result)
    if problems:
        raise PreflightError(problems)
    result.rows = _graph(cfg, stages, datasets, evaluate=targets is None and cfg.evaluate.enabled)
    problems = check_disk(cfg, [cfg.stage(r.stage) for r in result.rows
                                if r.status == "will run" and r.method != "-"])
    if problems:
        raise PreflightError(problems)
    return result


def check_disk(cfg: PipelineConfig, will_run: list) -> list[str]:
    """Refuse when the artifacts root has less free space than the stages that will run write
    at most (posttrain.disk.stage_bytes: each model, plus its checkpoints)."""
    weights = disk.model_bytes(cfg.model)
    needs = {s.name: disk.stage_bytes(cfg, s, weights) for s in will_run}
    if weights is None or not needs:
        return []
    free = disk.free_bytes(cfg.artifacts_root)
    total = sum(needs.values())
    if free >= total:
        return []
    each = ", ".join(f"{n}: {disk.human(b)}" for n, b in needs.items())
    return [(f"artifacts_root: {cfg.artifacts_root} has {disk.human(free)} free, but the stages "
             f"that will run write about {disk.human(total)} ({each}); free space there, point "
             "artifacts_root at a bigger disk, or lower checkpoint_keep")]


# ------------------------------------------------------------------------------------- model


def check_model(cfg: PipelineConfig) -> list[str]:
    """The base model is the built-in one, a local folder with safetensors weights, or a
    well-formed hub id."""
    name = cfg.model.name_or_path
    if name in ("tiny", TINY_VLM):
        return []
    folder = Path(name).expanduser()
    if folder.is_dir():
        return _check_model_folder(folder)
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or folder.exists()
    if looks_local or not _HUB_ID.match(name):
        return [(f"model.name_or_path: {name} is not a local model folder (it does not exist) "
                 "and not a hub id ('org/name'); give the folder that holds config.json and "
                 "*.safetensors, or a hub id")]
    return []


def check_launch(cfg: PipelineConfig) -> list[str]:
    path = cfg.launch.accelerate_config
    if path is not None and not Path(path).is_file():
        return [(f"launch.accelerate_config: {path} does not exist (see infra/accelerate/ for "
                 "DDP, FSDP and DeepSpeed configs)")]
    return []


def _tokenizer(cfg: PipelineConfig):
    """(the base model's tokenizer, []) or (None, [why it cannot be loaded]): a hub id that does
    not exist, or that cannot be fetched offline, is found here rather than by the first stage."""
    from posttrain.models import load_tokenizer

    try:
        if is_vision_model(cfg.model):
            return load_processor(cfg.model).tokenizer, []
        return load_tokenizer(cfg.model), []
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        why = (f"model.name_or_path: cannot load the tokenizer of {cfg.model.name_or_path}: "
               f"{first} (check the id and revision, network access to the hub or "
               "HF_HUB_OFFLINE with a filled cache, or give a local folder)")
        return None, [why]


def _check_model_folder(folder: Path) -> list[str]:
    if not (folder / "config.json").is_file():
        return [(f"model.name_or_path: {folder} has no config.json; it is not a transformers "
                 "model folder")]
    if any(folder.glob("*.safetensors")):
        return []
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(
        p.name for p in folder.glob("*.pt"))
    if pickles:
        return [f"model.name_or_path: {folder} holds only pickle weights ({', '.join(pickles)}); "
                "posttrain refuses pickle files (loading them can run arbitrary code). Convert "
                "once, if you trust the files: python -c \"from transformers import "
                "AutoModelForCausalLM as M, AutoTokenizer as T; d='" + str(folder) + "'; "
                "M.from_pretrained(d, use_safetensors=False).save_pretrained(d + '-safetensors'); "
                "T.from_pretrained(d).save_pretrained(d + '-safetensors')\" and point "
                "model.name_or_path at the new folder"]
    return [f"model.name_or_path: {folder} has no weights (*.safetensors)"]


# ------------------------------------------------------------------------------------ stages


def _check_stages(cfg: PipelineConfig, stages: list, datasets: dict, rows: dict,
                  tokenizer) -> list[str]:
    problems = []
    for stage in stages:
        fmt = datasets[stage.data]["format"]
        train, held = rows[stage.data]
        where = f"stages.{stage.name}"
        if method(stage).generates:
            problems += _check_online(cfg, stage, fmt, train, where)
            continue
        problems += _check_counts(cfg, stage, fmt, train, held, tokenizer, where)
    return problems


def _need(cfg: PipelineConfig, stage) -> int:
    return stage.per_device_batch_size * cfg.launch.num_processes


def _check_counts(cfg, stage, fmt, train, held, tokenizer, where) -> list[str]:
    """Whether the stage's tokenized training data fills one batch (and KTO's held-out split
    forms its mismatched pairs), counted by the stage's own tokenization."""
    need = _need(cfg, stage)
    units, what = _units(cfg, stage, fmt, train[:_SAMPLE], tokenizer)
    if len(train) > _SAMPLE and units * len(train) / _SAMPLE < 2 * need:
        units, what = _units(cfg, stage, fmt, train, tokenizer)
    elif len(train) > _SAMPLE:
        units = int(units * len(train) / _SAMPLE)  # an estimate, and far above one batch
    out = []
    if units < need:
        out.append(
            f"{where}: {units} {what} from data.{stage.data} cannot fill one batch of "
            f"{stage.per_device_batch_size} per process x {cfg.launch.num_processes} "
            f"process(es); lower per_device_batch_size to {max(units, 1)} or less, or give "
            "more data")
    if method(stage).unit == "unpaired" and held:
        held_units, _ = _units(cfg, stage, fmt, held[:_SAMPLE], tokenizer)
        if held_units < 2:
            out.append(f"{where}: KTO's held-out split of data.{stage.data} has {held_units} "
                       "example(s); its KL estimate needs at least 2 (raise eval_fraction or "
                       "give an eval_path)")
    return out


def _units(cfg, stage, fmt, rows, tokenizer) -> tuple[int, str]:
    from posttrain.data.packing import pack_bfd
    from posttrain.data.preference import (
        pairs_to_unpaired,
        tokenize_preference_rows,
        tokenize_unpaired_rows,
    )

    opts = {"max_length": stage.max_length, "truncation": stage.truncation, "source": stage.data}
    try:
        unit = method(stage).unit
        if unit == "examples":
            examples, _ = tokenize_sft_rows(rows, tokenizer,
                                            completion_only_loss=stage.completion_only_loss,
                                            **opts)
            if stage.packing:
                lengths = [len(e["input_ids"]) for e in examples]
                return len(pack_bfd(lengths, stage.max_length)) if lengths else 0, "packed rows"
            return len(examples), "examples"
        bad = cfg.data[stage.data].max_drop_fraction
        if unit == "unpaired":
            unpaired = rows if fmt == UNPAIRED_PREFERENCE else pairs_to_unpaired(rows)
            examples, _ = tokenize_unpaired_rows(unpaired, tokenizer, max_bad_fraction=bad,
                                                 **opts)
            return len(examples), "examples"
        pairs, _ = tokenize_preference_rows(rows, tokenizer, max_bad_fraction=bad, **opts)
        return len(pairs), "pairs"
    except DataError:
        return 0, "usable rows (too many were dropped in tokenization)"


def _check_online(cfg, stage, fmt, train, where) -> list[str]:
    out = []
    try:
        prompts = prompt_rows(train, fmt, f"data.{stage.data}")
    except DataError as e:
        return [f"{where}: {e}"]
    # GRPO and RLOO count completions, num_generations per prompt; PPO's one completion and
    # online DPO's one pair per prompt count prompts one for one.
    per_prompt = stage.num_generations if isinstance(stage, GroupRolloutConfig) else 1
    need = _need(cfg, stage) // per_prompt
    if len(prompts) < need:
        out.append(f"{where}: {len(prompts)} prompts in data.{stage.data} cannot fill one "
                   f"batch of {need} prompts; lower per_device_batch_size or give more data")
    if hasattr(stage, "reward_functions"):
        from posttrain.reward_functions import check_reward_function

        columns = sorted({k for r in prompts[:100] for k in r if k != "prompt"})
        for path in stage.reward_functions:
            if path == "reward_model":
                continue
            try:
                check_reward_function(path, columns)
            except ValueError as e:
                out.append(f"{where}.reward_functions: {e}")
    if getattr(stage, "environment", None) is not None:
        from posttrain.multiturn import agent_problems

        # imports the environment and the tools, builds the tools' schemas
        out += [f"{where}.{p}" for p in agent_problems(stage.environment)]
    return out


# ------------------------------------------------------------------------------- evaluation


def _check_evaluation(cfg: PipelineConfig, datasets: dict, rows: dict, result: Plan) -> list[str]:
    source = cfg.eval_source
    if source is None:
        return [("evaluate.data: no stage and no evaluate.data: name the data source whose "
                 "held-out prompts evaluation uses")]
    fmt = datasets[source]["format"]
    try:
        eval_rows(rows[source][1][:10], fmt, f"data.{source}")
    except DataError as e:
        return [f"evaluate.data: {e}"]
    if not rows[source][1]:
        return [f"evaluate.data: data.{source} has no held-out rows"]
    # Unknown tasks, hub data offline: refused before anything trains (a vision-language
    # model's tasks are refused by check_vision).
    if cfg.evaluate.tasks and not is_vision_model(cfg.model):
        held = eval_rows(rows[source][1], fmt, f"data.{source}")
        held = held[: cfg.evaluate.max_prompts] if cfg.evaluate.max_prompts else held
        problems = check_harness(cfg, held, datasets[source]["checker"])
        if problems:
            return problems
    result.available_metrics = evaluation_metrics(
        cfg, {n: d["format"] for n, d in datasets.items()},
        datasets[source]["checker"] is not None)
    if not cfg.promotion.enabled:
        return []
    try:
        resolved = resolve(cfg, result.available_metrics)
    except ConfigError as e:
        return str(e).splitlines()
    result.promotion = {"metric": resolved.metric, "direction": resolved.direction,
                        "guards": [g.model_dump() for g in resolved.guards],
                        "min_margin": resolved.min_margin,
                        "require_significance": resolved.require_significance}
    return []


# ------------------------------------------------------------------------------------ graph


def _graph(cfg: PipelineConfig, stages: list, datasets: dict, *, evaluate: bool) -> list[PlanRow]:
    """Each stage's key and whether its artifact exists. A stage downstream of one that will
    run gets its key only once that stage has run (the key holds the upstream digest)."""
    data_key = data_stage_key(cfg)
    out = [PlanRow("data", "-", "-", ", ".join(datasets), "-",
                   _status(cfg, "data", data_key), data_key)]
    data = {"datasets": datasets}
    known: dict[str, dict | None] = {}
    for s in stages:
        inputs = {"data": data, "start": known.get(s.start), "reward": known.get(s.reward)}
        blocked = (s.start != "base" and inputs["start"] is None) or (
            s.reward is not None and inputs["reward"] is None)
        key = None if blocked else training_key(cfg, s, inputs)
        manifest = artifacts.load_manifest(cfg.artifacts_root, s.name, key, full=False) \
            if key else None
        known[s.name] = manifest
        teacher = getattr(s, "teacher", None)  # GKD: a stage name or a model folder
        uses = [n for n in (s.reward, "reference" if uses_reference(s) else None,
                            teacher and f"teacher {teacher}") if n]
        out.append(PlanRow(s.name, s.method, s.start, s.data, ", ".join(uses) or "-",
                           "cached" if manifest else "will run", key))
    if evaluate:
        names = [s.name for s in stages if is_policy(s)]
        reward = cfg.eval_reward
        key = None
        if all(known.get(n) for n in names) and (reward is None or known.get(reward)):
            key = eval_stage_key(cfg, data, candidates(cfg, known),
                                 known[reward] if reward else None)
        out.append(PlanRow("evaluate", "-", "-", cfg.eval_source, reward or "-",
                           _status(cfg, "evaluate", key) if key else "will run", key))
    return out


def _status(cfg: PipelineConfig, stage: str, key: str) -> str:
    found = artifacts.load_manifest(cfg.artifacts_root, stage, key, full=False)
    return "cached" if found else "will run"
