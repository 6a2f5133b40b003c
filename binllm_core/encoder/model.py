"""The binarized collaborative encoder: a backbone (:data:`BACKBONES`; ``mf``: two embedding
tables; ``lightgcn``: the same tables propagated over the train interaction graph) followed, for
a binary model, by ``tanh(Linear(e))`` and a sign with a straight-through gradient. The score of
a pair is the inner product of the two codes (binary model) or of the two embeddings (float
model).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from binllm_core.config import EncoderConfig

BINARY, FLOAT = "binary", "continuous"


# ---- model -----------------------------------------------------------------------------------
class SignSTE(torch.autograd.Function):
    """``+1`` where the input is >= 0, else ``-1``; the gradient passes through unchanged."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    return SignSTE.apply(x)


class Backbone(nn.Module):
    """The ``mf`` backbone: user and item embedding tables (N(0,1) init, row 0 = padding).

    A backbone gives the embedding of every user and item (:meth:`tables`); its parameters are
    the two tables, so a checkpoint loads into any backbone.
    """

    needs_graph: ClassVar[bool] = False
    """Whether it is built with the normalized train interaction graph (the train positives)."""

    def __init__(
        self, user_num: int, item_num: int, cfg: EncoderConfig, adjacency: torch.Tensor | None
    ) -> None:
        super().__init__()
        self.user_emb = nn.Embedding(user_num, cfg.dim, padding_idx=0)
        self.item_emb = nn.Embedding(item_num, cfg.dim, padding_idx=0)

    def tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The embedding of every user and every item."""
        return self.user_emb.weight, self.item_emb.weight


class LightGCN(Backbone):
    """The same tables propagated ``lightgcn_layers`` times over the train graph, averaged."""

    needs_graph = True

    def __init__(
        self, user_num: int, item_num: int, cfg: EncoderConfig, adjacency: torch.Tensor | None
    ) -> None:
        super().__init__(user_num, item_num, cfg, adjacency)
        # A plain attribute, not a buffer: it is rebuilt from the samples, never checkpointed.
        self.adjacency = adjacency
        self.layers = cfg.lightgcn_layers

    def tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([self.user_emb.weight, self.item_emb.weight])
        total = x
        for _ in range(self.layers):
            x = torch.sparse.mm(self.adjacency, x)
            total = total + x
        mean = total / (self.layers + 1)
        return mean[: self.user_emb.num_embeddings], mean[self.user_emb.num_embeddings :]


BACKBONES: dict[str, type[Backbone]] = {"mf": Backbone, "lightgcn": LightGCN}
"""``encoder.backbone`` -> its class, built from (users, items, the encoder config, the
normalized train graph when its ``needs_graph``, else None). A new backbone is its class and an
entry here, and its name in :data:`binllm_core.config.ENCODER_BACKBONES` (config stays
torch-free; a test checks the two agree)."""


class CollabModel(nn.Module):
    """A backbone scored by inner products: of ±1 codes (binary) or of embeddings (float)."""

    def __init__(
        self,
        backbone: Backbone,
        dim: int,
        binary: bool,
        shared_projection: bool,
        prior_bits: int = 0,
        logit_scale: float = 1.0,
        bits: int = 0,
    ) -> None:
        """A binary model's codes have ``bits`` bits (0: ``dim``): the projection maps the
        ``dim``-dim embeddings to all but the prior bits. ``prior_bits`` (binary only) of them
        carry a learned item prior: a user's are always +1, an item's are its own ±1 (a table,
        not the projection), so each item's count of +1 among them adds to every user's inner
        product. A Hamming distance can then express what a float model holds in an item
        vector's norm (mostly its popularity), which ±1 codes of one length cannot.
        ``logit_scale`` (binary only) multiplies the codes' inner product into the training
        logits (the order is unchanged)."""
        super().__init__()
        self.backbone = backbone
        self.binary = binary
        self.logit_scale = logit_scale if binary else 1.0
        self.prior_bits = prior_bits if binary else 0
        if binary:
            learned = (bits or dim) - self.prior_bits
            self.proj_u = nn.Linear(dim, learned)
            self.proj_i = self.proj_u if shared_projection else nn.Linear(dim, learned)
            if self.prior_bits:
                self.item_prior = nn.Embedding(backbone.item_emb.num_embeddings, self.prior_bits)

    def forward(
        self,
        users: torch.Tensor,
        items: torch.Tensor,
        beta: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Logits of the pairs; in training mode a binary model mixes codes by ``beta``."""
        user_table, item_table = self.backbone.tables()
        eu, ei = user_table[users], item_table[items]
        if not self.binary:
            return (eu * ei).sum(-1)
        zu, zi = self._pre_sign(eu, ei, items)
        ou = self._codes(zu, beta, generator)
        oi = self._codes(zi, beta, generator)
        return (ou * oi).sum(-1) * self.logit_scale

    def _pre_sign(
        self, eu: torch.Tensor, ei: torch.Tensor, items: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``tanh(proj(e))`` of users and ``items``, with the prior bits (users': +1)."""
        zu, zi = torch.tanh(self.proj_u(eu)), torch.tanh(self.proj_i(ei))
        if not self.prior_bits:
            return zu, zi
        ones = torch.ones(*zu.shape[:-1], self.prior_bits, device=zu.device)
        return (
            torch.cat([zu, ones], -1),
            torch.cat([zi, torch.tanh(self.item_prior(items))], -1),
        )

    def _codes(
        self, z: torch.Tensor, beta: float, generator: torch.Generator | None
    ) -> torch.Tensor:
        if not self.training:
            return sign_ste(z)
        if beta <= 0.0:
            return z
        draw = torch.rand(z.shape, generator=generator).to(z.device)
        return torch.where(draw > beta, z, sign_ste(z))

    @torch.no_grad()
    def relaxed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The vectors the codes are the signs of: ``tanh(proj(e))``, or ``e`` for a float model."""
        user_table, item_table = self.backbone.tables()
        if self.binary:
            every = torch.arange(item_table.shape[0], device=item_table.device)
            return self._pre_sign(user_table, item_table, every)
        return user_table, item_table

    @torch.no_grad()
    def signs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """±1 codes of every user and item: ``sign(tanh(proj(e)))``, or ``sign(e)`` for a float
        model (its codes are then a plain sign binarization of the embeddings)."""
        user_table, item_table = self.relaxed()
        return SignSTE.apply(user_table), SignSTE.apply(item_table)

    @torch.no_grad()
    def predict(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Evaluation scores: code inner products (binary) or embedding inner products."""
        if self.binary:
            user_table, item_table = self.signs()
        else:
            user_table, item_table = self.backbone.tables()
        u = torch.from_numpy(users).to(user_table.device)
        i = torch.from_numpy(items).to(item_table.device)
        return (user_table[u] * item_table[i]).sum(-1).cpu().numpy()


class EncoderSet(nn.Module):
    """The models trained in one pass: ``binary`` (when configured) and ``continuous``."""

    def __init__(self, models: dict[str, CollabModel]) -> None:
        super().__init__()
        self.models = nn.ModuleDict(models)

    def forward(
        self,
        users: torch.Tensor,
        items: torch.Tensor,
        beta: float = 1.0,
        generator: torch.Generator | None = None,
        names: tuple[str, ...] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Each model's logits of the pairs; only ``names``'s where given (the models in
        training; the others take no part in the step)."""
        chosen = self.models if names is None else {n: self.models[n] for n in names}
        return {name: m(users, items, beta, generator) for name, m in chosen.items()}
