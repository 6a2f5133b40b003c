"""The LLM recommender: one object that owns what is trained and scored on the LLM side.

:class:`LLMRecommender` holds the loaded causal LM (:mod:`binllm_core.llm.loading`), its tokenizer,
the answer score, the LoRA adapter and a :class:`torch.nn.ModuleDict` of extra trainable modules
(room for a projector), behind one contract every caller uses:

* ``score(batch)`` — the answer score of each prompt of a :class:`PromptBatch`: the logit of
  ``Yes`` (less ``No`` under ``model.answer_score: yes_minus_no``) at the last position;
* ``loss(batch, task)`` — the training loss of a task's batch (:mod:`binllm_core.llm.objectives`):
  for ``rec``, BCE-with-logits of that score against the 0/1 labels; ``bpr`` and ``mim`` are
  the auxiliary tasks in words;
* ``save(folder)`` / ``load`` — the adapter (safetensors) and the extra modules, never the base.

The extra module of soft prompts is ``soft``: a :class:`~binllm_core.llm.soft.SoftTokens`
projector over the encoder's fixed vectors (:meth:`LLMRecommender.attach_soft`); a saved
adapter then holds its weights and shape (``soft.json``), never the vectors.

Batches are built from prompts by :mod:`binllm_core.llm.batches` (a task's ``collate``);
:class:`binllm_core.llm.scoring.Scorer` builds the scoring batches.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from binllm_core.config import FinetuneConfig, ModelConfig
from binllm_core.errors import ConfigError
from binllm_core.llm.backbone import ADAPTER_CONFIG, answer_token_id
from binllm_core.llm.batches import Batch, TargetBatch
from binllm_core.llm.loading import AnswerScore, LanguageModel, load_language_model
from binllm_core.llm.objectives import OBJECTIVES, REC, Objective
from binllm_core.llm.soft import (
    SOFT_SPEC,
    EntityVectors,
    SoftSpec,
    SoftTokens,
    soft_token_ids,
    title_vectors,
)
from binllm_core.modes import SOFT
from binllm_core.prompts.aux_rows import LETTERS

EXTRA_MODULES = "extra_modules.safetensors"
"""Where :meth:`LLMRecommender.save` writes the extra trainable modules, next to the adapter."""


# ---- the model a forward pass runs -------------------------------------------------------------
class AnswerModel(torch.nn.Module):
    """A batch -> what its task reads from the LM (the answer score of each prompt for ``rec``):
    the LM with its adapter and the extra trainable modules in one module, which is what DDP
    wraps on Ray Train."""

    def __init__(self, net: torch.nn.Module, answer: AnswerScore, letters: tuple[int, int]) -> None:
        super().__init__()
        self.net = net
        self.extra = torch.nn.ModuleDict()
        self.answer = answer
        self.letters = letters
        """Token ids of the two choices of a ``bpr`` prompt
        (:data:`binllm_core.prompts.aux_rows.LETTERS`)."""
        self.config = net.config
        """The base LM's config (the layer kinds of a key/value cache)."""
        self.objectives: dict[str, Objective] = dict(OBJECTIVES)
        """What each task trains; a tuning step may replace one (``rec`` in an rsllm step)."""

    @property
    def soft(self) -> SoftTokens | None:
        """The projector of soft prompts, when one is attached."""
        return self.extra[SOFT] if SOFT in self.extra else None

    def forward(self, batch: Batch | TargetBatch, task: str = REC) -> Any:
        return self.objectives[task].forward(self, batch)


# ---- the recommender ---------------------------------------------------------------------------
class LLMRecommender:
    """A causal LM that answers Yes/No about a user and an item, with its trainable parts."""

    def __init__(self, lm: LanguageModel) -> None:
        self.lm = lm
        letters = tuple(answer_token_id(lm.tokenizer, f" {x}") for x in LETTERS)
        self.model = AnswerModel(lm.model, lm.answer, letters)
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
    def from_backbone(
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

    @classmethod
    def from_saved(
        cls,
        model: ModelConfig,
        folder: str | Path,
        vectors: EntityVectors | None = None,
        device: torch.device | str = "cpu",
    ) -> LLMRecommender:
        """The inverse of :meth:`save`: the backbone of ``model`` on ``device`` with what the
        local ``folder`` holds (the adapter, the extra modules and, over the encoder's
        ``vectors``, the projector of a soft step), frozen."""
        rec = cls(load_language_model(model, device))
        rec.attach_adapter(str(folder), trainable=False)
        if vectors is not None:
            rec.load_soft(folder, vectors)
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
        return OBJECTIVES[REC].forward(self.model, batch)

    def loss(self, batch: Batch | TargetBatch, task: str = REC) -> torch.Tensor:
        """The training loss of ``task`` on its batch (through the training wrapper when one is
        set): for ``rec``, BCE-with-logits of the answer score against the batch's labels."""
        output = (self.forward_net or self.model)(batch, task)
        return self.model.objectives[task].loss(output, batch)

    # ---- soft prompts ----------------------------------------------------------------------
    def attach_soft(
        self,
        vectors: EntityVectors,
        projector: str = "collm",
        titles: dict[int, str] | None = None,
        source: str = "float",
    ) -> None:
        """A fresh projector of kind ``projector`` over ``vectors`` (the ``source`` column of
        the encoder's embeddings; a saved adapter's own projector replaces its weights when the
        adapter is attached after this); ``titles`` (iid -> title) gives the item-title vectors
        of the contrastive term."""
        embedding = self.lm.model.get_input_embeddings()
        spec = SoftSpec(projector, vectors.dim, int(embedding.weight.shape[1]), source)
        self._attach_soft(vectors, spec, titles)

    def _attach_soft(
        self, vectors: EntityVectors, spec: SoftSpec, titles: dict[int, str] | None
    ) -> None:
        embedding = self.lm.model.get_input_embeddings()
        title_table = None
        if titles is not None:
            title_table = title_vectors(self.tokenizer, embedding, titles, len(vectors.items))
        soft = SoftTokens(vectors, spec, soft_token_ids(self.tokenizer), title_table)
        self.extra[SOFT] = soft.to(self.device)

    def load_soft(self, folder: str | Path, vectors: EntityVectors) -> None:
        """The projector a saved adapter folder holds, over ``vectors`` (one-line error when the
        folder has none: it was not trained on soft prompts)."""
        spec = SoftSpec.read(folder)
        if spec is None:
            raise ConfigError(
                f"adapter {folder} has no projector ({SOFT_SPEC}): it was not trained on soft "
                "prompts",
                todo="score soft prompts with the adapter of a collm/rsllm step (or a soft step)",
            )
        self._attach_soft(vectors, spec, None)
        self._load_extra(Path(folder))

    def save(self, folder: str | Path) -> None:
        """The adapter (safetensors) and the extra modules' weights (and the projector's
        shape); never the base model, never the fixed vectors."""
        self.net.save_pretrained(str(folder))
        canonical_adapter_config(Path(folder) / ADAPTER_CONFIG)
        if len(self.extra):
            from safetensors.torch import save_file

            state = {k: v.detach().cpu().contiguous() for k, v in self.extra.state_dict().items()}
            save_file(state, str(Path(folder) / EXTRA_MODULES))
        if self.model.soft is not None:
            self.model.soft.spec.save(folder)

    def _load_extra(self, folder: Path) -> None:
        path = folder / EXTRA_MODULES
        if len(self.extra) and path.exists():
            from safetensors.torch import load_file

            self.extra.load_state_dict(load_file(str(path), device=str(self.device)))


SET_VALUED = ("target_modules", "exclude_modules")
"""Fields of a LoRA config that peft holds as sets and writes in the set's order, which differs
from process to process (string hashing is salted per process)."""


def canonical_adapter_config(path: Path) -> None:
    """Rewrite the ``adapter_config.json`` peft just saved canonically: keys sorted, the lists
    of :data:`SET_VALUED` sorted, so that the same adapter gives the same bytes (and content
    identity) whichever process saved it."""
    config = json.loads(path.read_text())
    for key in SET_VALUED:
        value = config.get(key)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            config[key] = sorted(value)
    path.write_text(json.dumps(config, indent=2, sort_keys=True))  # as peft writes it


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
