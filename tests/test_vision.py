"""Vision-language data, models and training (issue 21), in process: image rows in the public
schemas (llava-instruct-mix's `messages` with parts, RLAIF-V's prompt/chosen/rejected, images as
file paths, Parquet bytes or `datasets` Image features), their errors, the loss mask, the frozen
vision tower, LoRA on the language model, the images reaching the model, preflight's refusals.
The whole pipeline through `posttrain run` is tests/test_vision_pipeline.py."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from posttrain.config import LoraConfig, ModelConfig, SFTConfig, validate
from posttrain.config import PipelineConfig as Pipeline
from posttrain.data.loading import DataError, load_rows
from posttrain.data.packing import collate_padded
from posttrain.data.preference import collate_pairs
from posttrain.vision import models as vm
from posttrain.vision.images import store_images
from posttrain.vision.tokenize import tokenize_pair_rows, tokenize_sft_rows

TINY = ModelConfig(name_or_path="tiny-vlm")
N_IMAGE_TOKENS = (32 // 8) ** 2  # the tiny VLM: 32-pixel images, 8-pixel patches


def _png(colour: tuple[int, int, int], path: Path | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, format="PNG")
    if path is not None:
        path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def _llava_mix_row(image: str | dict) -> dict:
    """A row in HuggingFaceH4/llava-instruct-mix-vsft's schema: messages whose content is a list
    of parts (with `index` and a null `text` on image parts), an `images` list."""
    return {"messages": [
        {"role": "user", "content": [{"type": "image", "index": 0, "text": None},
                                     {"type": "text", "index": None, "text": "Colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "index": None, "text": "red"}]},
        {"role": "user", "content": [{"type": "text", "index": None, "text": "Sure?"}]},
        {"role": "assistant", "content": [{"type": "text", "index": None, "text": "yes"}]},
    ], "images": [image]}


def _pair_row(image) -> dict:
    """A row in HuggingFaceH4/rlaif-v_formatted's schema."""
    return {"prompt": [{"role": "user", "content": [{"type": "image"},
                                                    {"type": "text", "text": "Colour?"}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "red"}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "blue"}]}],
            "images": [image]}


@pytest.fixture(scope="module")
def processor():
    return vm.load_processor(TINY)


# ------------------------------------------------------------------------------------ data


def test_image_paths_are_read_relative_to_the_data_file_and_stored_by_content(tmp_path):
    _png((200, 0, 0), tmp_path / "a.png")
    _png((200, 0, 0), tmp_path / "same-pixels.png")
    _png((0, 0, 200), tmp_path / "b.png")
    rows = [_llava_mix_row("a.png"), _llava_mix_row("same-pixels.png"), _llava_mix_row("b.png")]
    out = tmp_path / "artifact"
    stored, report = store_images(rows, source="chat.jsonl", base_dir=tmp_path, out_dir=out)
    names = [r["images"][0] for r in stored]
    assert names[0] == names[1] != names[2]  # named by pixels, not by file name
    assert all(n.startswith("images/") and (out / n).is_file() for n in names)
    assert Image.open(out / names[2]).getpixel((0, 0)) == (0, 0, 200)
    assert report["rows_out"] == 3 and rows[0]["images"] == ["a.png"]  # the input is untouched


def test_parquet_images_as_bytes_and_datasets_image_features_load(tmp_path):
    import datasets

    rows = [_pair_row({"bytes": _png((0, 200, 0)), "path": None}),
            _pair_row({"bytes": _png((200, 200, 0)), "path": "x.png"})]
    features = datasets.Features({
        "prompt": [{"role": datasets.Value("string"),
                    "content": [{"type": datasets.Value("string"),
                                 "text": datasets.Value("string")}]}],
        "chosen": [{"role": datasets.Value("string"),
                    "content": [{"type": datasets.Value("string"),
                                 "text": datasets.Value("string")}]}],
        "rejected": [{"role": datasets.Value("string"),
                      "content": [{"type": datasets.Value("string"),
                                   "text": datasets.Value("string")}]}],
        "images": [datasets.Image()]})
    ds = datasets.Dataset.from_list(rows, features=features)
    ds.to_parquet(tmp_path / "pairs.parquet")
    loaded = load_rows(str(tmp_path / "pairs.parquet"))
    stored, _ = store_images(loaded, source="pairs.parquet", base_dir=tmp_path,
                             out_dir=tmp_path / "out")
    pixels = [Image.open(tmp_path / "out" / r["images"][0]).getpixel((3, 3)) for r in stored]
    assert pixels == [(0, 200, 0), (200, 200, 0)]


@pytest.mark.parametrize("make, expected", [
    (lambda d: _llava_mix_row("missing.png"),
     "row 2, field 'images': image 1 'missing.png': file not found"),
    (lambda d: (d / "bad.png").write_text("not an image") and _llava_mix_row("bad.png"),
     "row 2, field 'images': image 1 'bad.png': not a readable image"),
    (lambda d: {**_llava_mix_row("ok.png"), "images": ["ok.png", "ok.png"]},
     "row 2, field 'images': 2 image(s) for 1 image part(s)"),
    (lambda d: {**_llava_mix_row("ok.png"), "images": "ok.png"},
     "row 2, field 'images': expected a list of images, got str"),
    (lambda d: _llava_mix_row({"bytes": b"\x89PNG broken", "path": None}),
     "row 2, field 'images': image 1 (bytes): not a readable image"),
])
def test_bad_images_are_named_by_source_row_and_field(tmp_path, make, expected):
    _png((1, 2, 3), tmp_path / "ok.png")
    rows = [_llava_mix_row("ok.png"), make(tmp_path)]
    with pytest.raises(DataError) as err:
        store_images(rows, source="chat.jsonl", base_dir=tmp_path, out_dir=tmp_path / "out")
    assert str(err.value).startswith("chat.jsonl " + expected), err.value


def test_bad_images_can_be_dropped_and_counted(tmp_path):
    _png((1, 2, 3), tmp_path / "ok.png")
    rows = [_llava_mix_row("ok.png")] * 19 + [_llava_mix_row("gone.png")]
    kept, report = store_images(rows, source="s", base_dir=tmp_path, out_dir=tmp_path / "o",
                                on_bad_rows="drop", max_drop_fraction=0.1)
    assert len(kept) == 19 and report["dropped"] == {"missing image file": 1}
    with pytest.raises(DataError, match="2 of 20 rows have bad images"):
        store_images(rows[:18] + rows[-1:] * 2, source="s", base_dir=tmp_path,
                     out_dir=tmp_path / "o", on_bad_rows="drop", max_drop_fraction=0.05)


def test_the_data_stage_key_follows_an_edited_image_file(tmp_path):
    """The rows name images by path: editing one image (the JSONL unchanged) re-runs the data
    stage, so no stage trains on the old pixels."""
    from posttrain.stages.data import source_fingerprint

    _png((200, 0, 0), tmp_path / "a.png")
    (tmp_path / "chat.jsonl").write_text(json.dumps(_llava_mix_row("a.png")) + "\n")
    src = Pipeline.model_validate({"data": {"sft": {"path": str(tmp_path / "chat.jsonl")}}}
                                  ).data["sft"]
    before = source_fingerprint(src)
    assert source_fingerprint(src) == before
    import os
    import time

    _png((0, 200, 0), tmp_path / "a.png")
    os.utime(tmp_path / "a.png", ns=(time.time_ns(), time.time_ns() + 10**9))
    assert source_fingerprint(src) != before


# ------------------------------------------------------------------------------ tokenization


def _stored(rows, tmp_path):
    return store_images(rows, source="s", base_dir=tmp_path, out_dir=tmp_path)[0]


def test_sft_labels_cover_the_assistant_text_only_never_an_image_token(tmp_path, processor):
    _png((200, 0, 0), tmp_path / "a.png")
    rows = _stored([_llava_mix_row("a.png")], tmp_path)
    [example], report = tokenize_sft_rows(rows, processor, tmp_path, max_length=128, source="s")
    assert report["rows_out"] == 1
    ids, labels = example["input_ids"], example["labels"]
    image_id = processor.tokenizer.convert_tokens_to_ids(vm.IMAGE_TOKEN)
    assert ids.count(image_id) == N_IMAGE_TOKENS
    labelled = processor.tokenizer.decode([t for t, lab in zip(ids, labels) if lab != -100])
    assert labelled == "red<|end|>yes<|end|>"  # both assistant turns with their end token
    assert all(lab == -100 for t, lab in zip(ids, labels) if t == image_id)
    assert example["image_inputs"]["pixel_values"].shape == (1, 3, 32, 32)


def test_rows_longer_than_max_length_are_dropped_and_counted_or_refused(tmp_path, processor):
    _png((200, 0, 0), tmp_path / "a.png")
    rows = _stored([_llava_mix_row("a.png")], tmp_path)
    examples, report = tokenize_sft_rows(rows, processor, tmp_path, max_length=20, source="s")
    assert examples == [] and report["dropped_too_long"] == 1
    with pytest.raises(DataError, match=r"s row 1: \d+ tokens \(its image tokens included\) > "
                                        "max_length=20"):
        tokenize_sft_rows(rows, processor, tmp_path, max_length=20, source="s",
                          truncation="error")


def test_pairs_carry_their_image_in_both_halves_of_the_batch(tmp_path, processor):
    rows = _stored([_pair_row({"bytes": _png((200, 0, 0)), "path": None}),
                    _pair_row({"bytes": _png((0, 0, 200)), "path": None})], tmp_path)
    pairs, _ = tokenize_pair_rows(rows, processor, tmp_path, max_length=64, source="s")
    assert processor.tokenizer.decode(pairs[0]["chosen_ids"]) == "red<|end|>"
    batch = collate_pairs(pairs, processor.tokenizer.pad_token_id)
    pixels = batch["image_inputs"]["pixel_values"]
    assert pixels.shape == (4, 3, 32, 32)  # chosen rows 0-1, rejected rows 2-3
    assert torch.equal(pixels[0], pixels[2]) and torch.equal(pixels[1], pixels[3])
    assert not torch.equal(pixels[0], pixels[1])


# ------------------------------------------------------------------------------------ models


def test_the_vision_tower_is_frozen_by_default_and_trains_on_request():
    model = vm.prepare_trainable(vm.load_vlm(TINY), TINY)
    tower = vm.vision_tower(model)
    assert not any(p.requires_grad for p in tower.parameters())
    assert all(p.requires_grad for p in model.get_decoder().parameters())
    assert all(p.requires_grad for p in model.model.multi_modal_projector.parameters())
    on = TINY.model_copy(update={"train_vision_tower": True})
    assert all(p.requires_grad for p in vm.vision_tower(
        vm.prepare_trainable(vm.load_vlm(on), on)).parameters())


def test_lora_adapts_the_language_model_only():
    cfg = TINY.model_copy(update={"lora": LoraConfig(r=4)})
    model = vm.prepare_trainable(vm.load_vlm(cfg), cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ".language_model." in n for n in trainable)
    assert any(n.endswith("q_proj.lora_A.default.weight") for n in trainable)
    assert any("mlp.down_proj.lora_B" in n for n in trainable)


def test_sft_moves_the_language_model_and_leaves_the_vision_tower(tmp_path, processor):
    from posttrain.recipes import sft

    rows = _stored([_llava_mix_row({"bytes": _png((i * 20, 0, 0)), "path": None})
                    for i in range(8)], tmp_path)
    examples, _ = tokenize_sft_rows(rows, processor, tmp_path, max_length=128, source="s")
    model = vm.prepare_trainable(vm.load_vlm(TINY), TINY)
    tower = {n: p.detach().clone() for n, p in vm.vision_tower(model).named_parameters()}
    lm = {n: p.detach().clone() for n, p in model.get_decoder().named_parameters()}
    cfg = validate(SFTConfig, {"name": "sft", "max_steps": 3, "per_device_batch_size": 4,
                               "learning_rate": 1e-3, "warmup_steps": 1, "packing": False,
                               "max_length": 128, "eval_every": 3})
    final = sft.train(model, examples, examples[:2], cfg,
                      pad_token_id=processor.tokenizer.pad_token_id)
    assert final["eval_loss"] > 0
    assert all(torch.equal(p, tower[n]) for n, p in vm.vision_tower(model).named_parameters())
    assert any(not torch.equal(p, lm[n]) for n, p in model.get_decoder().named_parameters())


def test_the_images_reach_the_language_model(tmp_path, processor):
    """The same tokens with another image give other log-probs: the pixels are encoded into
    the image tokens' places (a text-only forward would ignore them)."""
    from posttrain.logprobs import SelectedLogits, shift_targets

    rows = _stored([_llava_mix_row({"bytes": _png((220, 40, 40)), "path": None}),
                    _llava_mix_row({"bytes": _png((40, 40, 220)), "path": None})], tmp_path)
    examples, _ = tokenize_sft_rows(rows, processor, tmp_path, max_length=128, source="s")
    assert examples[0]["input_ids"] == examples[1]["input_ids"]
    batch = collate_padded(examples, processor.tokenizer.pad_token_id)
    net = SelectedLogits(vm.load_vlm(TINY).eval())
    select, targets = shift_targets(batch["labels"])
    with torch.no_grad():
        logps, _ = net(batch["input_ids"], batch["attention_mask"], select, targets=targets,
                       image_inputs=batch["image_inputs"])
    first, second = logps.view(2, -1)
    assert not torch.allclose(first, second)


def test_the_saved_stage_loads_with_the_standard_auto_classes(tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from posttrain.models import save_model

    model = vm.load_vlm(TINY)
    save_model(model, vm.load_processor(TINY), tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "LlavaForConditionalGeneration"
    assert processor.tokenizer.convert_tokens_to_ids(vm.IMAGE_TOKEN) == \
        loaded.config.image_token_index
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                  loaded.state_dict().values()))


# ---------------------------------------------------------------------------------- preflight


def _vision_pipeline(**changes) -> Pipeline:
    values = {"model": {"name_or_path": "tiny-vlm"},
              "data": {"sft": {"path": "demo:vision-sft"},
                       "preference": {"path": "demo:vision-preference"}},
              "vision_demo": {"num_train": 40, "num_eval": 8},
              "stages": [{"name": "sft", "method": "sft", "data": "sft", "packing": False,
                          "max_steps": 2, "per_device_batch_size": 4}],
              "evaluate": {"data": "sft"}}
    for key, value in changes.items():
        values[key] = value
    return validate(Pipeline, values)


@pytest.mark.parametrize("change, message", [
    ({"stages": [{"name": "sft", "method": "sft", "data": "sft", "packing": True}]},
     "stages.sft (sft): packing is not supported for vision-language data"),
    ({"stages": [{"name": "kto", "method": "kto", "data": "preference"}]},
     "stages.kto (kto): vision-language models train with sft, dpo, orpo, simpo, cpo"),
    ({"model": {"name_or_path": "tiny"}},
     "stages.sft (sft): data.sft holds images, but model.name_or_path 'tiny' is a text model"),
    ({"evaluate": {"data": "sft", "tasks": ["posttrain_demo"]}},
     "evaluate.tasks: the harness tasks run on text models only"),
    ({"stages": [{"name": "sft", "method": "sft", "data": "sft", "packing": False,
                  "truncation": "truncate_right"}]},
     "stages.sft (sft): truncation: truncate_right would cut through an image's tokens"),
    ({"stages": [{"name": "sft", "method": "sft", "data": "sft", "packing": False,
                  "completion_only_loss": False}]},
     "stages.sft (sft): completion_only_loss: false is not supported"),
])
def test_preflight_refuses_what_vision_data_cannot_do(tmp_path, change, message):
    from posttrain.preflight import PreflightError, plan

    cfg = _vision_pipeline(artifacts_root=str(tmp_path), **change)
    with pytest.raises(PreflightError) as err:
        plan(cfg)
    assert message in str(err.value)
    assert not (tmp_path / "sft").exists()  # nothing trained


def test_preflight_passes_the_vision_pipeline_and_names_bad_images_first(tmp_path):
    from posttrain.preflight import PreflightError, plan

    result = plan(_vision_pipeline(artifacts_root=str(tmp_path)))
    assert [r.stage for r in result.rows] == ["data", "sft", "evaluate"]
    (tmp_path / "chat.jsonl").write_text(json.dumps(_llava_mix_row("nowhere.png")) + "\n")
    cfg = _vision_pipeline(artifacts_root=str(tmp_path),
                           data={"sft": {"path": str(tmp_path / "chat.jsonl")}})
    with pytest.raises(PreflightError, match="chat.jsonl row 1, field 'images': image 1 "
                                             "'nowhere.png': file not found"):
        plan(cfg)
