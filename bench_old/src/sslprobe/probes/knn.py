"""Weighted k-nearest-neighbour classification over a feature bank, in bounded-memory chunks.

- [0] Wu, Xiong, Yu, Lin, 2018, Unsupervised Feature Learning via Non-Parametric Instance Discrimination
  (weighted kNN with exp(sim / T) votes), https://arxiv.org/abs/1805.01978
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ALLOWED_DISTANCES", "Distance", "knn_predict"]

Distance = Literal["cosine", "euclidean"]
#: The values ``distance=`` takes.
ALLOWED_DISTANCES: tuple[str, ...] = ("cosine", "euclidean")


def knn_predict(
    queries: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 8192,
    distance: Distance = "cosine",
) -> Tensor:
    """Class scores ``(B, num_classes)`` of ``queries`` by weighted kNN over ``bank``.

    The ``k`` nearest bank entries vote for their label; the scores are the normalised vote totals. Two rules:

    - ``distance="cosine"``: nearest by cosine similarity ``s`` (features L2-normalised), vote ``exp(s / T)`` [0].
    - ``distance="euclidean"``: nearest by L2 distance ``d`` on the raw features, vote ``1 / (d + T)``.

    Bank rows whose label is negative (``-100``, unlabelled) or whose features are not finite never vote; when
    fewer than ``k`` rows may vote, the scores come from those that may (all zero when none). Distances are computed
    ``chunk_size`` bank rows at a time, keeping a running top-k, so memory stays ``O(B * (chunk_size + k))``
    whatever the bank size.

    Args:
        queries: features ``(B, D)``.
        bank: features ``(N, D)``; need not be normalised.
        bank_labels: integer labels ``(N,)``, below ``num_classes``; negative ones never vote.
        num_classes: number of classes ``C``.
        k: neighbours (capped at ``N``).
        temperature: vote temperature ``T``.
        chunk_size: bank rows per distance chunk.
        distance: ``"cosine"`` or ``"euclidean"``, as above.

    Returns:
        Scores ``(B, C)`` summing to 1 per row (zero rows where no bank row may vote).

    Raises:
        ValueError: for a ``distance`` other than ``"cosine"`` or ``"euclidean"``.

    Examples:
        >>> import torch
        >>> bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
        >>> knn_predict(torch.tensor([[1.0, 0.05]]), bank, torch.tensor([0, 0, 1]), 2, k=2).argmax(-1)
        tensor([0])
        >>> knn_predict(torch.tensor([[0.0, 2.0]]), bank, torch.tensor([0, 0, 1]), 2, k=1, distance="euclidean")
        tensor([[0., 1.]])
    """
    if distance not in ALLOWED_DISTANCES:
        raise ValueError(
            f"knn_predict: distance must be one of {', '.join(map(repr, ALLOWED_DISTANCES))}, got {distance!r}."
        )
    cosine = distance == "cosine"
    k = min(k, bank.shape[0])
    q = queries.float()  # (B, D)
    if cosine:
        q = F.normalize(q, dim=1)
    else:
        q_sq = q.pow(2).sum(dim=1, keepdim=True)  # (B, 1)
    # Scores to maximise: the cosine similarity, or minus the squared L2 distance.
    best = q.new_full((q.shape[0], 0), float("-inf"))  # (B, <=k)
    best_idx = torch.zeros((q.shape[0], 0), dtype=torch.long, device=q.device)
    for start in range(0, bank.shape[0], chunk_size):
        chunk = bank[start : start + chunk_size].float()  # (c, D)
        usable = (bank_labels[start : start + chunk_size] >= 0) & torch.isfinite(chunk).all(dim=1)  # (c,)
        if cosine:
            scores = q @ F.normalize(chunk, dim=1).T  # (B, c)
        else:
            scores = (2 * q @ chunk.T - q_sq - chunk.pow(2).sum(dim=1)).clamp_max(0)  # (B, c): -d^2
        scores = scores.masked_fill(~usable, float("-inf"))
        top = scores.topk(min(k, scores.shape[1]), dim=1)  # (B, <=k)
        best = torch.cat([best, top.values], dim=1)  # (B, <=2k)
        best_idx = torch.cat([best_idx, top.indices + start], dim=1)
        if best.shape[1] > k:
            keep = best.topk(k, dim=1)
            best, best_idx = keep.values, best_idx.gather(1, keep.indices)
    if cosine:
        # Shifting by the row's best similarity leaves the normalised votes unchanged and keeps exp() finite for a
        # small temperature; a row with no usable neighbour (all -inf) is shifted by 0.
        top_sim = best.amax(dim=1, keepdim=True) if best.shape[1] else best.new_zeros((q.shape[0], 1))
        shift = torch.where(torch.isfinite(top_sim), top_sim, torch.zeros_like(top_sim))  # (B, 1)
        weights = ((best - shift) / temperature).exp()  # (B, k); 0 where a row may not vote
    else:
        weights = 1 / ((-best).sqrt() + temperature)  # (B, k); d = inf gives 0
    votes = torch.zeros(q.shape[0], num_classes, device=q.device)
    votes.scatter_add_(1, bank_labels.long()[best_idx].clamp_min(0), weights)  # (B, C)
    return votes / votes.sum(dim=1, keepdim=True).clamp_min(torch.finfo(votes.dtype).tiny)
