"""Loading the causal LM (:mod:`binllm_core.llm.backbone` finds its files), and how its answer is
read (:class:`AnswerScore`).

A ``.gguf`` is converted once per node to a model folder that loads fast. What is trained and
scored on top of the loaded model is :class:`binllm_core.llm.recommender.LLMRecommender`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from binllm_core.config import ModelConfig
from binllm_core.io.artifacts import (
    build_once,
)
from binllm_core.llm.backbone import (
    ANSWER,
    NO_ANSWER,
    TINY,
    TINY_VOCAB,
    ModelSource,
    _from_pretrained,
    _set_up,
    answer_token_id,
    cache_dir,
    fetched,
    gguf_identity,
    load_tokenizer,
    resolve_source,
)


@dataclass(frozen=True)
class AnswerScore:
    """How a prompt's score is read from the logits at its last position: the ``Yes`` logit, less
    the ``No`` logit when ``no_id`` is set (``model.answer_score``)."""

    yes_id: int
    no_id: int | None = None

    def __call__(self, last_logits: torch.Tensor) -> torch.Tensor:
        """A new float32 tensor ``(batch,)``: never a view that keeps the logits alive."""
        score = last_logits[:, self.yes_id].clone()
        if self.no_id is not None:
            score = score - last_logits[:, self.no_id]
        return score.float()


@dataclass
class LanguageModel:
    """A loaded causal LM with its tokenizer and how its answer is scored (the LLM's backbone;
    not to be confused with the collaborative encoder's ``Backbone``)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    answer: AnswerScore

    @property
    def yes_id(self) -> int:
        return self.answer.yes_id


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is float32 on CPU (bfloat16 matmuls are many times slower there), else bf16."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return getattr(torch, name)


def _converted_name(gguf_id: str, dtype: torch.dtype) -> str:
    import transformers

    return f"{gguf_id}-{str(dtype).removeprefix('torch.')}-transformers{transformers.__version__}"


def converted_gguf(cfg: ModelConfig, source: ModelSource, dtype: torch.dtype) -> str:
    """A model folder (weights in ``dtype``, tokenizer) converted from the gguf ``source``,
    made once per node, GGUF file version and dtype under ``{model.cache_dir}/converted``:
    dequantizing a GGUF takes seconds to minutes, loading the folder a fraction of that."""
    name = _converted_name(gguf_identity(cfg, source), dtype)
    root = cache_dir(cfg, "converted")
    final = os.path.join(root, name)
    if os.path.isdir(final):
        return final
    local = fetched(cfg, source)
    return build_once(root, name, lambda tmp: _convert_gguf(local, dtype, tmp))


def _convert_gguf(source: ModelSource, dtype: torch.dtype, folder: str) -> None:
    """Dequantize the local GGUF ``source`` into ``folder`` (save_pretrained of the model, with
    no quantization config left, and of its tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = _from_pretrained(AutoModelForCausalLM, source, dtype=dtype)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # the folder holds plain weights: no GGUF left to read
        quantizer.remove_quantization_config(model)
    model.save_pretrained(folder)
    _from_pretrained(AutoTokenizer, source).save_pretrained(folder)


def load_language_model(cfg: ModelConfig, device: torch.device | str = "cpu") -> LanguageModel:
    """Model (eval mode, on ``device``, dtype from config) with tokenizer and ``Yes`` id. A
    ``.gguf`` backbone is loaded from its folder converted once per node and dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device)
    dtype = resolve_dtype(cfg.dtype, device)
    source = resolve_source(cfg)
    if source.kind == TINY:
        tokenizer = load_tokenizer(cfg)
        model = tiny_model(vocab_size=TINY_VOCAB, pad_token_id=tokenizer.pad_token_id)
        model = model.to(dtype)
    else:
        if source.kind == "gguf":
            local = ModelSource("folder", converted_gguf(cfg, source, dtype))
        else:
            local = fetched(cfg, source)
        tokenizer = _set_up(_from_pretrained(AutoTokenizer, local))
        model = _from_pretrained(AutoModelForCausalLM, local, dtype=dtype)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.to(device).eval()
    return LanguageModel(model, tokenizer, answer_score(tokenizer, cfg))


def answer_score(tokenizer: PreTrainedTokenizerBase, cfg: ModelConfig) -> AnswerScore:
    """The :class:`AnswerScore` that ``cfg.answer_score`` names, with this tokenizer's ids."""
    yes = answer_token_id(tokenizer, ANSWER)
    if cfg.answer_score == "yes_logit":
        return AnswerScore(yes)
    return AnswerScore(yes, answer_token_id(tokenizer, NO_ANSWER))


def tiny_model(vocab_size: int, pad_token_id: int | None, seed: int = 0) -> PreTrainedModel:
    """A 2-layer, 64-wide random Llama; the same ``seed`` gives the same weights everywhere."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        pad_token_id=pad_token_id,
        tie_word_embeddings=False,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    torch.random.set_rng_state(generator_state)
    return model
