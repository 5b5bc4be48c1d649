"""Tiny tokenizer and model, loading (safetensors only), LoRA and saving."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain import models
from posttrain.config import DemoTaskConfig, LoraConfig, ModelConfig, TinyModelConfig
from posttrain.data import demo

TINY = TinyModelConfig(hidden_size=32, num_hidden_layers=1, intermediate_size=64)


@pytest.fixture()
def model(tokenizer):
    return models.build_tiny_model(TINY, tokenizer)


def _batch(tokenizer) -> torch.Tensor:
    """Two texts right-padded with <pad> to one length."""
    encoded = tokenizer(["rev abcd dcba<|end|>", "3+4= 7"], padding=True, return_tensors="pt")
    return encoded["input_ids"]


def test_tokenizer_round_trips_every_demo_prompt_and_answer(tokenizer):
    cfg = DemoTaskConfig(num_train=3000, conversational=False)
    texts = {"\n\n", "Hello, World!\t(x) <y>"}
    for row in demo.generate_preference(cfg, 0, "train"):
        texts.update((row["prompt"], row["chosen"], row["rejected"]))
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert len(ids) == len(text)  # one id per character, no special tokens added
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text
    # outside the vocabulary: no id (byte-level BPE without byte fallback, as AutoTokenizer's
    # Qwen2Tokenizer builds it, so the two always agree)
    assert tokenizer("é")["input_ids"] == []


def test_tokenizer_special_tokens(tokenizer):
    assert len(tokenizer) == 103
    assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.unk_token) == (
        "<pad>",
        "<|end|>",
        "<unk>",
    )
    assert tokenizer.bos_token is None
    # special tokens are matched before the per-character split
    ids = tokenizer("<|user|>hi<|end|>")["input_ids"]
    assert ids == [tokenizer.convert_tokens_to_ids("<|user|>"), *tokenizer("hi")["input_ids"], 5]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hi"


def test_chat_template_renders_expected_string_and_ids(tokenizer):
    messages = [{"role": "user", "content": "3+4="}, {"role": "assistant", "content": "7"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<|user|>3+4=<|end|><|assistant|>7<|end|>"
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>3+4=<|end|><|assistant|>"
    # transformers 5: tokenize=True returns a BatchEncoding unless return_dict=False
    encoded = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True)
    ids = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, return_dict=False)
    user, assistant, end = tokenizer.convert_tokens_to_ids(["<|user|>", "<|assistant|>", "<|end|>"])
    expected = [user, *tokenizer("3+4=")["input_ids"], end, assistant]
    assert encoded["input_ids"] == expected and ids == expected


def test_tokenizer_and_model_save_load_round_trip(tokenizer, model, tmp_path):
    models.save_model(model, tokenizer, tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin"))
    text = "<|user|>rev abcd<|end|><|assistant|>dcba<|end|>"
    for loaded_tok in (
        models.load_trained_tokenizer(tmp_path),
        models.load_tokenizer(ModelConfig(), path=tmp_path),
        models.load_tokenizer(ModelConfig(name_or_path=str(tmp_path))),
    ):
        assert loaded_tok(text)["input_ids"] == tokenizer(text)["input_ids"]
        assert loaded_tok.chat_template == tokenizer.chat_template
        assert (loaded_tok.pad_token_id, loaded_tok.eos_token_id) == (0, 5)
    loaded = models.load_trained(tmp_path)
    assert loaded.config.tie_word_embeddings
    assert loaded.generation_config.eos_token_id == 5 and loaded.generation_config.pad_token_id == 0
    model.eval()
    x = _batch(tokenizer)
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
    via_cfg = models.load_causal_lm(ModelConfig(), path=tmp_path)
    assert via_cfg.config.hidden_size == TINY.hidden_size


def test_tokenizer_alone_round_trips_through_auto_tokenizer(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "<|user|>sort 3915<|end|><|assistant|>1359<|end|>"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.chat_template == tokenizer.chat_template
    assert loaded.decode(loaded(text)["input_ids"]) == text


def test_auto_tokenizer_next_to_a_qwen2_config(tokenizer, model, tmp_path):
    # transformers 5's AutoTokenizer builds Qwen2Tokenizer next to a qwen2 config.json whatever
    # the folder declares; the tiny tokenizer is one, so the ids (spaces included) survive
    models.save_model(model, tokenizer, tmp_path)
    auto = AutoTokenizer.from_pretrained(tmp_path)
    assert auto("rev abcd")["input_ids"] == tokenizer("rev abcd")["input_ids"]


def test_tiny_model_is_seeded_and_sized(tokenizer):
    a = models.build_tiny_model(TINY, tokenizer)
    before = torch.random.get_rng_state()
    b = models.build_tiny_model(TINY, tokenizer)
    assert torch.equal(torch.random.get_rng_state(), before)  # global RNG untouched
    c = models.build_tiny_model(TINY.model_copy(update={"seed": 1}), tokenizer)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    assert a.lm_head.weight is a.model.embed_tokens.weight
    assert a.config.vocab_size == len(tokenizer)
    assert (a.config.pad_token_id, a.config.eos_token_id) == (0, 5)
    default = models.load_causal_lm(ModelConfig())
    assert models.count_parameters(default) == (130_048, 130_048)


def test_lora_trains_only_adapters(model):
    base_total = models.count_parameters(model)[1]
    peft_model = models.apply_lora(model, LoraConfig(r=4, alpha=8))
    assert isinstance(peft_model, PeftModel)
    trainable, total = models.count_parameters(peft_model)
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert total - trainable == base_total
    fresh = models.build_tiny_model(TINY, models.build_tiny_tokenizer())
    only_q = models.apply_lora(fresh, LoraConfig(r=2, target_modules=("q_proj",)))
    adapted = {n.split(".lora_")[0] for n, p in only_q.named_parameters() if p.requires_grad}
    assert adapted and all(n.endswith("self_attn.q_proj") for n in adapted)


def test_save_model_merges_lora_into_a_plain_model(tokenizer, model, tmp_path):
    peft_model = models.apply_lora(model, LoraConfig(r=4, alpha=8))
    with torch.no_grad():  # lora_B starts at zero: make the adapter matter
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    peft_model.eval()
    x = _batch(tokenizer)
    with torch.no_grad():
        expected = peft_model(x).logits
    models.save_model(peft_model, tokenizer, tmp_path)
    assert isinstance(peft_model, PeftModel)  # the caller's model keeps its adapters
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    loaded = models.load_trained(tmp_path)
    assert not isinstance(loaded, PeftModel)
    assert not any("lora" in n for n, _ in loaded.named_parameters())
    with torch.no_grad():
        got = loaded(x).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    with peft_model.disable_adapter(), torch.no_grad():
        assert (peft_model(x).logits - expected).abs().max() > 1e-3  # the merge carried the adapter


def test_pickled_weights_are_refused(tokenizer, model, tmp_path):
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):
        models.load_trained(tmp_path)
    with pytest.raises(OSError, match="safetensors"):
        models.load_causal_lm(ModelConfig(name_or_path=str(tmp_path)))


def test_hub_loading_passes_revision_and_trust_remote_code(monkeypatch):
    calls = {}

    def fake(kind):
        def from_pretrained(name, **kwargs):
            calls[kind] = (name, kwargs)
            return models.build_tiny_tokenizer() if kind == "tok" else None

        return from_pretrained

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake("model"))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", fake("tok"))
    cfg = ModelConfig(name_or_path="org/model", revision="abc123", dtype="bfloat16")
    models.load_causal_lm(cfg)
    models.load_tokenizer(cfg)
    name, kwargs = calls["model"]
    assert name == "org/model"
    assert kwargs["trust_remote_code"] is False and kwargs["use_safetensors"] is True
    assert kwargs["revision"] == "abc123" and kwargs["dtype"] is torch.bfloat16
    assert kwargs["attn_implementation"] == "sdpa"
    assert calls["tok"] == ("org/model", {"revision": "abc123", "trust_remote_code": False})


def test_load_tokenizer_falls_back_to_eos_for_padding(monkeypatch, tokenizer):
    no_pad = models.build_tiny_tokenizer()
    no_pad.pad_token = None
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: no_pad)
    loaded = models.load_tokenizer(ModelConfig(name_or_path="org/model"))
    assert loaded.pad_token == "<|end|>"
    assert models.load_tokenizer(ModelConfig()).pad_token == "<pad>"
