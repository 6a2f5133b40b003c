"""Loading the causal LM and its tokenizer, and how its answer is read (:class:`AnswerScore`).

Where weights come from (a local folder, a ``.gguf`` file, a hub id only when the user names one,
or the tiny random model of the tests) and the tokenizer set-up every caller shares: left
padding and truncation, so the answer cue at the end of a prompt is the last column of a batch.
The ``Yes`` token id is read from the tokenizer as it tokenizes the answer right after a prompt,
because BPE tokenizers give ``Yes`` and `` Yes`` different ids. What is trained and scored on
top of the loaded model is :class:`binllm_core.recommender.LLMRecommender`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from binllm_core.config import ModelConfig
from binllm_core.errors import ConfigError
from binllm_core.soft import add_soft_tokens

TINY = "tiny"
ANSWER = " Yes"
NO_ANSWER = " No"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PROBE = '#Question: Answer with "Yes" or "No".\n#Answer:'


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


@dataclass(frozen=True)
class Source:
    """Where weights come from: ``kind`` is tiny, gguf, folder or hub."""

    kind: str
    path: str
    gguf_file: str = ""


def resolve_source(cfg: ModelConfig) -> Source:
    """Classify ``cfg.backbone`` without touching the network."""
    name = cfg.backbone
    if name == TINY:
        return Source(TINY, TINY)
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise _missing(name)
        return Source("gguf", str(path.parent), path.name)
    if cfg.gguf_file:
        if not (path / cfg.gguf_file).is_file():
            raise _missing(str(path / cfg.gguf_file))
        return Source("gguf", str(path), cfg.gguf_file)
    if path.is_dir():
        return Source("folder", str(path))
    if _HUB_ID.match(name) and not name.startswith((".", "/", "~")):
        return Source("hub", name)
    raise _missing(name)


GGUF_MAGIC = b"GGUF"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
)
"""Files of which a Hugging Face model folder holds at least one (its tokenizer)."""


def check_backbone(cfg: ModelConfig) -> Source:
    """Where the weights come from, checked without loading them: a ``.gguf`` file starts with
    the GGUF magic bytes, a folder holds ``config.json`` and a tokenizer file. A one-line
    :class:`ConfigError` otherwise, so that a run stops before any stage, not at render."""
    source = resolve_source(cfg)
    if source.kind == "gguf":
        path = Path(source.path, source.gguf_file)
        with path.open("rb") as handle:
            head = handle.read(len(GGUF_MAGIC))
        if head != GGUF_MAGIC:
            raise ConfigError(
                f"model.backbone {path} is not a GGUF file (it starts with {head!r})",
                todo="give a .gguf model file, a model folder, a hub id org/name, or tiny",
            )
    elif source.kind == "folder":
        folder = Path(source.path)
        lacking = [] if (folder / "config.json").is_file() else ["config.json"]
        if not any((folder / name).is_file() for name in TOKENIZER_FILES):
            lacking.append(f"tokenizer file ({', '.join(TOKENIZER_FILES[:3])}, ...)")
        if lacking:
            raise ConfigError(
                f"model.backbone {folder} is not a model folder: "
                f"it has no {' and no '.join(lacking)}",
                todo="give a folder written by save_pretrained (model and tokenizer), a .gguf "
                "file, a hub id org/name, or tiny",
            )
    return source


def _missing(name: str) -> ConfigError:
    return ConfigError(
        f"model.backbone {name} is not there",
        todo="give a local model folder, a .gguf file, a hub id org/name, or tiny",
    )


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is float32 on CPU (bfloat16 matmuls are many times slower there), else bf16."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return getattr(torch, name)


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer alone, set up for scoring: left padding and truncation, a pad token."""
    from transformers import AutoTokenizer

    source = resolve_source(cfg)
    if source.kind == TINY:
        tokenizer = tiny_tokenizer()
    else:
        tokenizer = _from_pretrained(AutoTokenizer, source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    add_soft_tokens(tokenizer)  # never in prompts in words; soft prompts hold them
    # Left side for both: the answer cue at the end of a prompt must stay in the last column.
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    return tokenizer


def load_language_model(cfg: ModelConfig, device: torch.device | str = "cpu") -> LanguageModel:
    """Model (eval mode, on ``device``, dtype from config) with tokenizer and ``Yes`` id."""
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    dtype = resolve_dtype(cfg.dtype, device)
    tokenizer = load_tokenizer(cfg)
    source = resolve_source(cfg)
    if source.kind == TINY:
        model = tiny_model(vocab_size=TINY_VOCAB, pad_token_id=tokenizer.pad_token_id)
        model = model.to(dtype)
    else:
        model = _from_pretrained(AutoModelForCausalLM, source, dtype=dtype)
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


def _from_pretrained(factory: Any, source: Source, **kwargs: Any) -> Any:
    if source.kind == "gguf":
        kwargs["gguf_file"] = source.gguf_file
    if source.kind != "hub":
        kwargs["local_files_only"] = True
    try:
        return factory.from_pretrained(source.path, **kwargs)
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"cannot load model {source.path} ({first})",
            todo="check model.backbone; without network give a local folder or a .gguf file",
        ) from None


def answer_token_id(tokenizer: PreTrainedTokenizerBase, answer: str = ANSWER) -> int:
    """The first token the tokenizer gives ``answer`` when it follows a prompt."""
    before = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    after = tokenizer(_PROBE + answer, add_special_tokens=False)["input_ids"]
    common = 0
    while common < min(len(before), len(after)) and before[common] == after[common]:
        common += 1
    if common >= len(after):
        raise ConfigError(f"the tokenizer gives no token for the answer {answer!r}")
    return int(after[common])


# ---- the tiny backbone (tests, configs/tiny.yaml) ---------------------------------------------

_TINY_WORDS = (
    "Question A user has given high ratings to the following movies books movie book "
    "Leverage information predict whether would enjoy titled Answer with Yes or No "
    "Additionally we have about user's preferences encoded in feature Using all available make "
    "a prediction none unkow n"
).split()
_TINY_SPECIAL = ("<pad>", "<unk>", "<s>", "</s>")
_TINY_SYMBOLS = list("0123456789.,:;?!\"'()[]#-_/&\\<>") + [chr(c) for c in range(97, 123)]


TINY_VOCAB = len(dict.fromkeys([*_TINY_SPECIAL, *_TINY_SYMBOLS, *_TINY_WORDS]))
"""The tiny model's vocabulary: the tiny tokenizer's words (not the soft tokens added to it)."""


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A word-level tokenizer over a fixed vocabulary: template words, digits (one token each),
    punctuation and single letters; anything else is ``<unk>``. Deterministic, nothing trained."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(dict.fromkeys([*_TINY_SPECIAL, *_TINY_SYMBOLS, *_TINY_WORDS]))
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Split(Regex(r"[.,:;?!#\"()\[\]\\]"), behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
    )


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
