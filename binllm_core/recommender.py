"""The LLM recommender: one object that owns what is trained and scored on the LLM side.

:class:`LLMRecommender` holds the loaded causal LM (:mod:`binllm_core.llm`), its tokenizer, the
answer score, the LoRA adapter and a :class:`torch.nn.ModuleDict` of extra trainable modules
(room for a projector), behind one contract every caller uses:

* ``score(batch)`` — the answer score of each prompt of a :class:`PromptBatch`: the logit of
  ``Yes`` (less ``No`` under ``model.answer_score: yes_minus_no``) at the last position;
* ``loss(batch)`` — BCE-with-logits of that score against the 0/1 labels;
* ``save(folder)`` / ``load`` — the adapter (safetensors) and the extra modules, never the base.

A training batch is built from prompts by :func:`collate` (tokenise, then :func:`pad_left`, or
group prompts that share a prefix into a :class:`~binllm_core.prefix_sharing.SharedPrefixBatch`);
:class:`binllm_core.scoring.Scorer` builds both kinds of batch for scoring.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from binllm_core.config import FinetuneConfig, ModelConfig
from binllm_core.llm import AnswerScore, LanguageModel, load_language_model
from binllm_core.prefix_sharing import (
    PrefixCut,
    SharedPrefixBatch,
    group_by_prefix,
    left_padded,
    positions,
    tokenize_with_prefix,
)

EXTRA_MODULES = "extra_modules.safetensors"
"""Where :meth:`LLMRecommender.save` writes the extra trainable modules, next to the adapter."""


# ---- batches -----------------------------------------------------------------------------------
@dataclass
class PromptBatch:
    """Whole prompts, left-padded (the answer cue in the last column), with labels when
    training. :class:`~binllm_core.prefix_sharing.SharedPrefixBatch` is the other kind of batch:
    prompts grouped by a shared prefix that runs once per group."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None = None

    @property
    def n_tokens(self) -> int:
        """Real (non-pad) tokens."""
        return int(self.attention_mask.sum())

    computed_tokens = n_tokens

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str) -> PromptBatch:
        labels = None if self.labels is None else self.labels.to(device)
        return PromptBatch(self.input_ids.to(device), self.attention_mask.to(device), labels)

    def last_logits(self, net: torch.nn.Module, config: Any = None) -> torch.Tensor:
        """Logits at each prompt's last token, shape ``(batch, vocab)``."""
        out = net(
            input_ids=self.input_ids,
            attention_mask=self.attention_mask,
            position_ids=positions(self.attention_mask),
            logits_to_keep=1,
        )
        return out.logits[:, -1]


Batch = PromptBatch | SharedPrefixBatch
"""What the recommender scores and trains on."""


def tokenize(tokenizer: Any, prompts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of each prompt: no special tokens added, truncated from the left."""
    return tokenizer(
        list(prompts), add_special_tokens=False, truncation=True, max_length=max_length
    )["input_ids"]


def pad_left(
    ids: Sequence[Sequence[int]], pad_id: int, labels: Sequence[int] | None = None
) -> PromptBatch:
    """Token id lists as one left-padded batch."""
    input_ids, mask = left_padded(ids, pad_id)
    target = None if labels is None else torch.as_tensor(np.asarray(labels), dtype=torch.float32)
    return PromptBatch(input_ids, mask, target)


def collate(
    tokenizer: Any,
    prompts: Sequence[str],
    labels: Sequence[int] | None,
    max_length: int,
    cut: PrefixCut | None = None,
) -> Batch:
    """Prompts (and their 0/1 labels) as one batch: the only way training batches are built.
    With a prefix ``cut``, prompts that share their prefix tokens form groups whose prefix runs
    once, and every other prompt is a group of one (its prefix and suffix run as two pieces of
    one sequence, so a group of one pads little next to short suffixes); the rows and labels
    then follow the groups (see :meth:`SharedPrefixBatch.build`)."""
    tokens = tokenize_with_prefix(tokenizer, prompts, max_length, cut)
    groups = group_by_prefix(tokens)
    if len(groups) == len(tokens.ids):
        return pad_left(tokens.ids, tokenizer.pad_token_id, labels)
    prefix = [tokens.prefix_tokens[g[0]] or len(tokens.ids[g[0]]) - 1 for g in groups]
    return SharedPrefixBatch.build(tokens.ids, groups, prefix, tokenizer.pad_token_id, labels)


# ---- the model a forward pass runs -------------------------------------------------------------
class AnswerModel(torch.nn.Module):
    """A batch -> the answer score of each prompt (float32): the LM with its adapter and the
    extra trainable modules in one module, which is what DDP wraps on Ray Train."""

    def __init__(self, net: torch.nn.Module, answer: AnswerScore) -> None:
        super().__init__()
        self.net = net
        self.extra = torch.nn.ModuleDict()
        self.answer = answer
        self.config = net.config
        """The base LM's config (the layer kinds of a key/value cache)."""

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.answer(batch.last_logits(self.net, self.config))


# ---- the recommender ---------------------------------------------------------------------------
class LLMRecommender:
    """A causal LM that answers Yes/No about a user and an item, with its trainable parts."""

    def __init__(self, lm: LanguageModel) -> None:
        self.lm = lm
        self.model = AnswerModel(lm.model, lm.answer)
        """What a forward pass runs: :attr:`net` and :attr:`extra`, scoring a batch."""
        self.forward_net: torch.nn.Module | None = None
        """A wrapper of :attr:`model` for training (a DDP module on Ray Train), when set."""

    @property
    def net(self) -> torch.nn.Module:
        """The LM: the base model, or the base wrapped with its adapter."""
        return self.model.net

    @net.setter
    def net(self, value: torch.nn.Module) -> None:
        self.model.net = value

    @property
    def extra(self) -> torch.nn.ModuleDict:
        """Trainable modules besides the adapter (e.g. a projector), saved with it."""
        return self.model.extra

    # ---- building --------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        model: ModelConfig,
        adapter: str = "",
        finetune: FinetuneConfig | None = None,
        trainable: bool = False,
        device: torch.device | str = "cpu",
    ) -> LLMRecommender:
        """The backbone of ``model`` on ``device``; with the adapter saved in the local folder
        ``adapter``, or a fresh trainable one when ``trainable`` and no folder is given."""
        rec = cls(load_language_model(model, device))
        if adapter or trainable:
            rec.attach_adapter(adapter, finetune or FinetuneConfig(), trainable)
        return rec

    def attach_adapter(
        self, folder: str = "", cfg: FinetuneConfig | None = None, trainable: bool = True
    ) -> None:
        """Wrap the frozen base with a LoRA adapter: the one saved in ``folder``, or a fresh one
        shaped by ``cfg`` (``finetune.lora_*``)."""
        from peft import PeftModel, get_peft_model

        if folder:
            self.net = PeftModel.from_pretrained(self.lm.model, folder, is_trainable=trainable)
            self._load_extra(Path(folder))
        else:
            self.net = get_peft_model(self.lm.model, lora_config(cfg or FinetuneConfig()))
        self.net.train(trainable)

    def merge_adapter(self) -> None:
        """Fold the LoRA weights into the base for inference (one matmul per layer, not two)."""
        if hasattr(self.net, "merge_and_unload"):
            self.net = self.net.merge_and_unload()
        self.net.eval()

    # ---- the contract ----------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return self.lm.tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def score(self, batch: Batch) -> torch.Tensor:
        """The answer score of each prompt (in the batch's row order), float32, ``(batch,)``."""
        return self.model(batch)

    def loss(self, batch: Batch) -> torch.Tensor:
        """BCE-with-logits of the answer score against the batch's labels (through the training
        wrapper when one is set)."""
        assert batch.labels is not None, "a training batch needs labels"
        scores = (self.forward_net or self.model)(batch)
        return F.binary_cross_entropy_with_logits(scores, batch.labels.float())

    def save(self, folder: str | Path) -> None:
        """The adapter (safetensors) and the extra modules' weights; never the base model."""
        self.net.save_pretrained(str(folder))
        if len(self.extra):
            from safetensors.torch import save_file

            state = {k: v.detach().cpu().contiguous() for k, v in self.extra.state_dict().items()}
            save_file(state, str(Path(folder) / EXTRA_MODULES))

    def _load_extra(self, folder: Path) -> None:
        path = folder / EXTRA_MODULES
        if len(self.extra) and path.exists():
            from safetensors.torch import load_file

            self.extra.load_state_dict(load_file(str(path), device=str(self.device)))


def lora_config(cfg: FinetuneConfig) -> Any:
    """The peft ``LoraConfig`` of the run (official: r 8, alpha 16, dropout 0.05, q/v)."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
