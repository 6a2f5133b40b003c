"""The LLM recommender: one object that owns what is trained and scored on the LLM side.

:class:`LLMRecommender` holds the loaded causal LM (:mod:`binllm_core.llm`), its tokenizer, the
answer score, the LoRA adapter and a :class:`torch.nn.ModuleDict` of extra trainable modules
(room for a projector), behind one contract every caller uses:

* ``score(batch)`` — the answer score of each prompt of a :class:`PromptBatch`: the logit of
  ``Yes`` (less ``No`` under ``model.answer_score: yes_minus_no``) at the last position;
* ``loss(batch)`` — BCE-with-logits of that score against the 0/1 labels;
* ``save(folder)`` / ``load`` — the adapter (safetensors) and the extra modules, never the base.

A batch is built from prompts by :func:`collate` (tokenise, then :func:`pad_left`), the one place
that decides tokenisation and padding for training, evaluation and scoring alike.
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
from binllm_core.llm import LanguageModel, load_language_model

EXTRA_MODULES = "extra_modules.safetensors"
"""Where :meth:`LLMRecommender.save` writes the extra trainable modules, next to the adapter."""


# ---- batches -----------------------------------------------------------------------------------
@dataclass
class PromptBatch:
    """Left-padded prompts (the answer cue in the last column), with labels when training."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None = None

    @property
    def n_tokens(self) -> int:
        """Real (non-pad) tokens."""
        return int(self.attention_mask.sum())

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str) -> PromptBatch:
        labels = None if self.labels is None else self.labels.to(device)
        return PromptBatch(self.input_ids.to(device), self.attention_mask.to(device), labels)


def tokenize(tokenizer: Any, prompts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of each prompt: no special tokens added, truncated from the left."""
    return tokenizer(
        list(prompts), add_special_tokens=False, truncation=True, max_length=max_length
    )["input_ids"]


def pad_left(
    ids: Sequence[Sequence[int]], pad_id: int, labels: Sequence[int] | None = None
) -> PromptBatch:
    """Token id lists as one left-padded batch."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, tokens in enumerate(ids):
        if tokens:
            input_ids[row, width - len(tokens) :] = torch.as_tensor(tokens, dtype=torch.long)
            mask[row, width - len(tokens) :] = 1
    target = None if labels is None else torch.as_tensor(np.asarray(labels), dtype=torch.float32)
    return PromptBatch(input_ids, mask, target)


def collate(
    tokenizer: Any, prompts: Sequence[str], labels: Sequence[int] | None, max_length: int
) -> PromptBatch:
    """Prompts (and their 0/1 labels) as one batch: the only way batches are built."""
    return pad_left(tokenize(tokenizer, prompts, max_length), tokenizer.pad_token_id, labels)


# ---- the recommender ---------------------------------------------------------------------------
class LLMRecommender:
    """A causal LM that answers Yes/No about a user and an item, with its trainable parts."""

    def __init__(self, lm: LanguageModel) -> None:
        self.lm = lm
        self.net: torch.nn.Module = lm.model
        """What a forward pass runs: the base model, or the base wrapped with its adapter."""
        self.extra = torch.nn.ModuleDict()
        """Trainable modules besides the adapter (e.g. a projector), saved with it."""
        self.forward_net: torch.nn.Module | None = None
        """A wrapper of :attr:`net` for training (a DDP module on Ray Train), when set."""

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
        params = [p for p in self.net.parameters() if p.requires_grad]
        return params + [p for p in self.extra.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> None:
        self.net.train(mode)
        self.extra.train(mode)

    def score(self, batch: PromptBatch, net: torch.nn.Module | None = None) -> torch.Tensor:
        """The answer score of each prompt, float32, shape ``(batch,)``."""
        out = (net or self.net)(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=1
        )
        return self.lm.answer(out.logits[:, -1])

    def loss(self, batch: PromptBatch) -> torch.Tensor:
        """BCE-with-logits of the answer score against the batch's labels (through the training
        wrapper when one is set)."""
        assert batch.labels is not None, "a training batch needs labels"
        return F.binary_cross_entropy_with_logits(
            self.score(batch, self.forward_net), batch.labels.float()
        )

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
