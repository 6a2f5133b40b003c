"""The backbone's files and its tokenizer, torch-free (rendering and token counting load only this).

Where weights come from (a model folder or a ``.gguf`` file, on a local path or at any fsspec
URI, fetched once per node by :mod:`binllm_core.io.artifacts`; a hub id only when the user names
one; or the tiny random model of the tests), and the tokenizer set-up every caller shares: left
padding and truncation, so the answer cue at the end of a prompt is the last column of a batch,
and the soft-prompt placeholder tokens. The ``Yes`` token id is read from the tokenizer as it
tokenizes the answer right after a prompt, because BPE tokenizers give ``Yes`` and `` Yes``
different ids.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from binllm_core.config import ModelConfig
from binllm_core.errors import ConfigError
from binllm_core.io.artifacts import (
    as_folder,
    exists,
    fetch,
    identity,
    is_remote,
    join_uri,
    listing,
    missing,
    read_head,
)
from binllm_core.modes import ITEM_TOKEN, USER_TOKEN


def add_soft_tokens(tokenizer: Any) -> tuple[int, int]:
    """Add the two placeholder tokens (special: never split, never merged with the text around
    them) if the tokenizer lacks them; their ids (user, item)."""
    missing = [t for t in (USER_TOKEN, ITEM_TOKEN) if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return tokenizer.convert_tokens_to_ids(USER_TOKEN), tokenizer.convert_tokens_to_ids(ITEM_TOKEN)


TINY = "tiny"
ANSWER = " Yes"
NO_ANSWER = " No"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PROBE = '#Question: Answer with "Yes" or "No".\n#Answer:'


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from: ``kind`` is tiny, gguf, folder or hub; ``remote`` when ``path``
    is a URI (``s3://``, ``gs://``, ``https://``...) whose files are fetched when loaded."""

    kind: str
    path: str
    gguf_file: str = ""
    remote: bool = False

    @property
    def gguf_path(self) -> str:
        """The ``.gguf`` file (a path or URI) of a gguf source."""
        return join_uri(self.path, self.gguf_file)


def resolve_source(cfg: ModelConfig) -> ModelSource:
    """Classify ``cfg.backbone`` without touching the network (a local one is looked at)."""
    name = cfg.backbone
    if name == TINY:
        return ModelSource(TINY, TINY)
    if is_remote(name):
        if name.rstrip("/").endswith(".gguf"):
            parent, _, file = name.rstrip("/").rpartition("/")
            return ModelSource("gguf", parent, file, remote=True)
        if cfg.gguf_file:
            return ModelSource("gguf", name.rstrip("/"), cfg.gguf_file, remote=True)
        return ModelSource("folder", name, remote=True)
    path = Path(name.removeprefix("file://")).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise _missing(name)
        return ModelSource("gguf", str(path.parent), path.name)
    if cfg.gguf_file:
        if not (path / cfg.gguf_file).is_file():
            raise _missing(str(path / cfg.gguf_file))
        return ModelSource("gguf", str(path), cfg.gguf_file)
    if path.is_dir():
        return ModelSource("folder", str(path))
    if _HUB_ID.match(name) and not name.startswith((".", "/", "~")):
        return ModelSource("hub", name)
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
BACKBONE = "model.backbone"
OPTIONS = "model.storage_options"


def check_backbone(cfg: ModelConfig) -> ModelSource:
    """Where the weights come from, checked without loading them: a ``.gguf`` file starts with
    the GGUF magic bytes, a folder holds ``config.json`` and a tokenizer file. A remote one is
    checked where it lies (its first bytes, its listing), never downloaded. A one-line
    :class:`ConfigError` otherwise, so that a run stops before any stage, not at render."""
    source = resolve_source(cfg)
    options = cfg.storage_options
    if source.kind == "gguf":
        path = source.gguf_path
        if source.remote and not exists(path, options, BACKBONE, OPTIONS):
            raise missing(path, BACKBONE, OPTIONS)
        head = read_head(path, len(GGUF_MAGIC), options, BACKBONE, OPTIONS)
        if head != GGUF_MAGIC:
            raise ConfigError(
                f"model.backbone {path} is not a GGUF file (it starts with {head!r})",
                todo="give a .gguf model file, a model folder, a hub id org/name, or tiny",
            )
    elif source.kind == "folder":
        if source.remote:
            folder, entries = listing(as_folder(source.path), options, BACKBONE, OPTIONS)
            names = set(entries) if folder else set()
        else:
            names = {p.name for p in Path(source.path).iterdir() if p.is_file()}
        lacking = [] if "config.json" in names else ["config.json"]
        if not names & set(TOKENIZER_FILES):
            lacking.append(f"tokenizer file ({', '.join(TOKENIZER_FILES[:3])}, ...)")
        if lacking:
            raise ConfigError(
                f"model.backbone {source.path} is not a model folder: "
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


# ---- model files on this node ------------------------------------------------------------------
def cache_dir(cfg: ModelConfig, part: str) -> str:
    """``{model.cache_dir}/{part}`` on this node (``~`` expanded here)."""
    return os.path.join(os.path.expanduser(cfg.cache_dir), part)


def fetched(cfg: ModelConfig, source: ModelSource) -> ModelSource:
    """``source`` with its files on this node: a remote folder or ``.gguf`` file fetched once
    per node and version into ``{model.cache_dir}/fetched``; a local one as it is."""
    if not source.remote:
        return source
    where = cache_dir(cfg, "fetched")
    options = cfg.storage_options
    if source.kind == "gguf":
        path = fetch(source.gguf_path, options, where, BACKBONE, OPTIONS)
        return ModelSource("gguf", os.path.dirname(path), os.path.basename(path))
    return ModelSource("folder", fetch(as_folder(source.path), options, where, BACKBONE, OPTIONS))


ADAPTER_CONFIG = "adapter_config.json"
"""The file every saved LoRA adapter folder holds."""


def is_adapter(uri: str, storage_options: dict[str, Any] | None = None, setting: str = "") -> bool:
    """Whether the folder at ``uri`` (a local path or any fsspec URI) holds a saved adapter
    (:data:`ADAPTER_CONFIG`), looked up where it lies, nothing downloaded; a store that cannot
    be reached is a one-line error."""
    return exists(join_uri(uri, ADAPTER_CONFIG), storage_options, "adapter folder", setting)


def fetch_adapter(
    cfg: ModelConfig, uri: str, storage_options: dict[str, Any] | None = None, setting: str = ""
) -> str:
    """A local folder holding the adapter at ``uri``: a local one as it is, a remote one fetched
    once per node and version into ``{model.cache_dir}/adapters``; a folder that is not there is
    a one-line :class:`ConfigError` (``setting`` names the storage options to check)."""
    where = cache_dir(cfg, "adapters")
    return fetch(as_folder(uri), storage_options, where, "adapter folder", setting)


def gguf_identity(cfg: ModelConfig, source: ModelSource) -> str:
    """The identity of a gguf source's file (where it lies: names, sizes and stamps)."""
    return identity(source.gguf_path, cfg.storage_options, BACKBONE, OPTIONS)


def _converted_any(cfg: ModelConfig, source: ModelSource) -> str:
    """A folder converted from the gguf ``source`` already on this node (any dtype), or ''."""
    import transformers

    root = cache_dir(cfg, "converted")
    if not os.path.isdir(root):
        return ""
    head = f"{gguf_identity(cfg, source)}-"
    tail = f"-transformers{transformers.__version__}"
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name.startswith(head) and name.endswith(tail) and os.path.isdir(path):
            return path
    return ""


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer alone, set up for scoring: left padding and truncation, a pad token. A
    ``.gguf`` backbone's comes from its converted folder when this node has one (read in a
    fraction of a second), else from the GGUF file (seconds; nothing is converted for it)."""
    from transformers import AutoTokenizer

    source = resolve_source(cfg)
    if source.kind == TINY:
        tokenizer = tiny_tokenizer()
    elif source.kind == "gguf":
        folder = _converted_any(cfg, source)
        local = ModelSource("folder", folder) if folder else fetched(cfg, source)
        tokenizer = _from_pretrained(AutoTokenizer, local)
    else:
        tokenizer = _from_pretrained(AutoTokenizer, fetched(cfg, source))
    return _set_up(tokenizer)


def _set_up(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    add_soft_tokens(tokenizer)  # never in prompts in words; soft prompts hold them
    # Left side for both: the answer cue at the end of a prompt must stay in the last column.
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    return tokenizer


def _from_pretrained(factory: Any, source: ModelSource, **kwargs: Any) -> Any:
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
