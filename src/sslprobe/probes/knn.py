"""Weighted k-nearest-neighbour classification over a feature bank, in bounded-memory chunks.

- [0] Wu, Xiong, Yu, Lin, 2018, Unsupervised Feature Learning via Non-Parametric Instance Discrimination
  (weighted kNN with exp(sim / T) votes), https://arxiv.org/abs/1805.01978
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["knn_predict"]


def knn_predict(
    queries: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 8192,
) -> Tensor:
    """Class scores ``(B, num_classes)`` of ``queries`` by weighted kNN over ``bank``, cosine similarity.

    The ``k`` most similar bank entries vote for their label with weight ``exp(sim / temperature)``; the scores
    are the normalised vote totals. Similarities are computed ``chunk_size`` bank rows at a time, keeping a running
    top-k, so memory stays ``O(B * (chunk_size + k))`` whatever the bank size.

    Args:
        queries: features ``(B, D)``.
        bank: features ``(N, D)``; need not be normalised.
        bank_labels: integer labels ``(N,)``.
        num_classes: number of classes ``C``.
        k: neighbours (capped at ``N``).
        temperature: vote temperature ``T``.
        chunk_size: bank rows per similarity chunk.

    Returns:
        Scores ``(B, C)`` summing to 1 per row.

    Examples:
        >>> import torch
        >>> bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
        >>> knn_predict(torch.tensor([[1.0, 0.05]]), bank, torch.tensor([0, 0, 1]), 2, k=2).argmax(-1)
        tensor([0])
    """
    k = min(k, bank.shape[0])
    q = F.normalize(queries.float(), dim=1)  # (B, D)
    best_sims = q.new_full((q.shape[0], 0), float("-inf"))
    best_idx = torch.zeros((q.shape[0], 0), dtype=torch.long, device=q.device)
    for start in range(0, bank.shape[0], chunk_size):
        chunk = F.normalize(bank[start : start + chunk_size].float(), dim=1)  # (c, D)
        sims = q @ chunk.T  # (B, c)
        top = sims.topk(min(k, sims.shape[1]), dim=1)  # (B, <=k)
        best_sims = torch.cat([best_sims, top.values], dim=1)  # (B, <=2k)
        best_idx = torch.cat([best_idx, top.indices + start], dim=1)
        if best_sims.shape[1] > k:
            keep = best_sims.topk(k, dim=1)
            best_sims, best_idx = keep.values, best_idx.gather(1, keep.indices)
    weights = (best_sims / temperature).exp()  # (B, k)
    votes = torch.zeros(q.shape[0], num_classes, device=q.device)
    votes.scatter_add_(1, bank_labels[best_idx], weights)  # (B, C)
    return votes / votes.sum(dim=1, keepdim=True).clamp_min(torch.finfo(votes.dtype).tiny)
