"""What a packed checkpoint says about its model: the source's config.json as written (plus the quantization config),
``architectures`` always present (converters and runtimes pick the model class by it), the tokenizer's
``model_max_length`` and chat template kept — for an HF-directory source and for a GGUF source."""

from __future__ import annotations

import json

from qtool.formats.hf_checkpoint import config_dict, save_tokenizer
from qtool.loading import load_config, load_tokenizer, resolve_source, source_config_json
from tests.conftest import SMOLLM2, STORIES, require


def test_hf_source_config_is_kept_as_written_and_updated_where_the_model_changed(tmp_path):
    require(STORIES)
    src = resolve_source(str(STORIES))
    source = source_config_json(src)
    assert source == json.loads((STORIES / "config.json").read_text())
    config = load_config(src)
    out = config_dict(config, "LlamaForCausalLM", source)
    assert out == source  # every key, every value, nothing invented (no id2label, return_dict, ...)
    untied = load_config(src)
    untied.tie_word_embeddings = False  # e.g. a rotation fused differently into the embedding and the head
    assert config_dict(untied, "LlamaForCausalLM", source)["tie_word_embeddings"] is False
    tokenizer = load_tokenizer(src)
    save_tokenizer(tokenizer, tmp_path, config.max_position_embeddings)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["model_max_length"] == 512


def test_gguf_source_gets_its_architecture_context_and_tokenizer_limits(tmp_path):
    require(SMOLLM2)
    src = resolve_source(str(SMOLLM2))
    assert source_config_json(src) is None  # the header is the config
    config = load_config(src)
    out = config_dict(config, "LlamaForCausalLM", None)
    assert out["architectures"] == ["LlamaForCausalLM"]  # transformers' GGUF config has none: llama.cpp needs it
    assert out["max_position_embeddings"] == 8192 and out["num_key_value_heads"] == 3
    assert "id2label" not in out and "return_dict" not in out and not any(k.startswith("_") for k in out)
    tokenizer = load_tokenizer(src)
    assert tokenizer.model_max_length > 1e29  # transformers' "no limit" sentinel for a GGUF tokenizer
    save_tokenizer(tokenizer, tmp_path, config.max_position_embeddings)
    written = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert written["model_max_length"] == 8192
    # transformers 5's "TokenizersBackend" is a name transformers 4 (llama.cpp's converter) does not resolve
    assert written["tokenizer_class"] == "PreTrainedTokenizerFast"
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(tmp_path)  # and transformers 5 reads it back as the same tokenizer
    assert reloaded("Hello, world")["input_ids"] == tokenizer("Hello, world")["input_ids"]
    assert tokenizer.model_max_length > 1e29  # the tokenizer in use is left as it was
    assert "<|im_start|>" in (tmp_path / "chat_template.jinja").read_text()


def test_a_source_without_architectures_gets_the_model_class():
    require(STORIES)
    src = resolve_source(str(STORIES))
    source = {k: v for k, v in source_config_json(src).items() if k != "architectures"}
    config = load_config(src)
    config.architectures = None
    assert config_dict(config, "LlamaForCausalLM", source)["architectures"] == ["LlamaForCausalLM"]
