"""Computing a shared prompt prefix once: grouping prompts by it, and the two-pass forward.

Every prompt of a user with the same history starts with the same text — the question, the
liked titles, the user's code — and only the tail from the target item on differs. Prompts are
tokenised whole, and the cut between prefix and suffix is taken on the *whole prompt's* token
boundaries (the last token that ends at or before the prefix's last character), so a BPE merge
across the character cut never changes a token; prompts whose prefix tokens are identical form
a group. A :class:`SharedPrefixBatch` then runs in two passes:

1. the groups' prefixes, left-padded, in one forward pass that returns their key/value cache
   (a :class:`PrefixCache`, whose tensors no later pass modifies);
2. every suffix, left-padded in the middle (pad tokens between its prefix and its first token,
   masked out), with a fresh cache made of its group's prefix rows: the answer cue is then the
   last column, as in a whole-prompt batch, and its logits are the only ones computed.

Position ids are explicit (a real token's position is its index among real tokens), so the
scores equal those of scoring each prompt whole (float32 differences of order 1e-6). The cost
per group of ``n`` prompts falls from ``n (P + S)`` to ``P + n S`` tokens.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

PrefixCut = Callable[[str], int]
"""A prompt -> how many of its leading characters belong to the shared prefix (0: none)."""


# ---- grouping ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tokenized:
    """Token ids of prompts and, for each, how many leading tokens are its shareable prefix."""

    ids: list[list[int]]
    prefix_tokens: list[int]

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.ids), np.int64, len(self.ids))


def tokenize_with_prefix(
    tokenizer: Any, prompts: Sequence[str], max_length: int, cut: PrefixCut | None
) -> Tokenized:
    """Whole-prompt token ids (no special tokens, truncated from the left) and the number of
    leading tokens that end within ``cut(prompt)`` characters, at most all tokens but the last
    (a suffix holds at least the answer cue's last token)."""
    enc = tokenizer(
        list(prompts),
        add_special_tokens=False,
        truncation=True,
        max_length=max_length,
        return_offsets_mapping=cut is not None,
    )
    ids = enc["input_ids"]
    if cut is None:
        return Tokenized(ids, [0] * len(ids))
    prefix = []
    for prompt, tokens, offsets in zip(prompts, ids, enc["offset_mapping"], strict=True):
        ends = [end for _, end in offsets]
        prefix.append(min(bisect_right(ends, cut(prompt)), max(len(tokens) - 1, 0)))
    return Tokenized(ids, prefix)


def group_by_prefix(tokens: Tokenized) -> list[list[int]]:
    """Prompt indices grouped by identical non-empty prefix tokens, in order of first
    appearance; a prompt without a prefix is a group of its own."""
    groups: dict[bytes, list[int]] = {}
    out: list[list[int]] = []
    for i, (ids, k) in enumerate(zip(tokens.ids, tokens.prefix_tokens, strict=True)):
        if k == 0:
            out.append([i])
            continue
        key = np.asarray(ids[:k], np.int64).tobytes()
        if key not in groups:
            groups[key] = []
            out.append(groups[key])
        groups[key].append(i)
    return out


# ---- padding ----------------------------------------------------------------------------------
def left_padded(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of token lists padded on the left to the longest."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.as_tensor(list(r), dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids, mask


def positions(mask: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
    """Position ids of a left-padded batch: a real token's index among the real tokens (plus
    ``start`` per row); pads get the first position, which the mask hides anyway."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return pos if start is None else pos + start[:, None]


# ---- the two passes ---------------------------------------------------------------------------
@dataclass
class PrefixCache:
    """The key/value states of a batch of prefixes, read-only: each suffix pass builds a fresh
    cache from (copies of) these rows, which that pass alone extends."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    mask: torch.Tensor
    lengths: torch.Tensor
    config: Any

    @classmethod
    def compute(
        cls, net: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, config: Any
    ) -> PrefixCache:
        from transformers import DynamicCache

        cache = DynamicCache(config=config)
        net(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions(mask),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        return cls(layers, mask, mask.sum(-1), config)

    def rows(self, group: torch.Tensor) -> Any:
        """A new cache holding prefix ``group[i]`` in row ``i``."""
        from transformers import DynamicCache

        data = [(k.index_select(0, group), v.index_select(0, group)) for k, v in self.layers]
        return DynamicCache(ddp_cache_data=data, config=self.config)


def suffix_logits(
    net: torch.nn.Module,
    prefix: PrefixCache,
    group: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """Logits at the last column of left-padded suffixes ``ids`` whose prefix is row ``group``
    of ``prefix``: shape ``(len(ids), vocab)``."""
    out = net(
        input_ids=ids,
        attention_mask=torch.cat([prefix.mask.index_select(0, group), mask], dim=1),
        position_ids=positions(mask, prefix.lengths.index_select(0, group)),
        cache=prefix.rows(group),
        use_cache=True,
        logits_to_keep=1,
    )
    return out.logits[:, -1]


@dataclass
class SharedPrefixBatch:
    """Prompts as groups that share a prefix: the prefixes (left-padded), every prompt's
    suffix (left-padded) and the group it belongs to, with labels when training."""

    prefix_ids: torch.Tensor
    prefix_mask: torch.Tensor
    suffix_ids: torch.Tensor
    suffix_mask: torch.Tensor
    group: torch.Tensor
    labels: torch.Tensor | None = None
    order: torch.Tensor | None = None
    """The input position of each row (rows follow the groups, not the input); None: the
    input's order."""

    @classmethod
    def build(
        cls,
        ids: Sequence[Sequence[int]],
        groups: Sequence[Sequence[int]],
        prefix_tokens: Sequence[int],
        pad_id: int,
        labels: Sequence[int] | None = None,
    ) -> SharedPrefixBatch:
        """Rows in group order: group ``g`` holds ``ids[i] for i in groups[g]``, which share
        their first ``prefix_tokens[g]`` tokens; ``labels`` are in the order of ``ids``."""
        order = [i for g in groups for i in g]
        prefixes = [ids[g[0]][: prefix_tokens[n]] for n, g in enumerate(groups)]
        suffixes = [ids[i][prefix_tokens[n] :] for n, g in enumerate(groups) for i in g]
        prefix_ids, prefix_mask = left_padded(prefixes, pad_id)
        suffix_ids, suffix_mask = left_padded(suffixes, pad_id)
        group = torch.as_tensor([n for n, g in enumerate(groups) for _ in g], dtype=torch.long)
        target = None
        if labels is not None:
            target = torch.as_tensor(np.asarray(labels)[order], dtype=torch.float32)
        rows = torch.as_tensor(order, dtype=torch.long)
        return cls(prefix_ids, prefix_mask, suffix_ids, suffix_mask, group, target, rows)

    def __len__(self) -> int:
        return int(self.suffix_ids.shape[0])

    @property
    def n_tokens(self) -> int:
        """Tokens of the whole prompts the batch stands for."""
        prefix = self.prefix_mask.sum(-1).index_select(0, self.group)
        return int(prefix.sum() + self.suffix_mask.sum())

    @property
    def computed_tokens(self) -> int:
        """Tokens the two passes run (each prefix once)."""
        return int(self.prefix_mask.sum() + self.suffix_mask.sum())

    def to(self, device: torch.device | str) -> SharedPrefixBatch:
        labels = None if self.labels is None else self.labels.to(device)
        return SharedPrefixBatch(
            self.prefix_ids.to(device),
            self.prefix_mask.to(device),
            self.suffix_ids.to(device),
            self.suffix_mask.to(device),
            self.group.to(device),
            labels,
            None if self.order is None else self.order.to(device),
        )

    def last_logits(self, net: torch.nn.Module, config: Any, soft: Any = None) -> torch.Tensor:
        """Logits at each prompt's last token, in row (group) order (prompts in words only:
        ``soft`` is unused, soft prompts never share a prefix)."""
        prefix = PrefixCache.compute(net, self.prefix_ids, self.prefix_mask, config)
        return suffix_logits(net, prefix, self.group, self.suffix_ids, self.suffix_mask)
