"""Which entries a pruning rule zeroes: the lowest scores in a whole matrix, in every row,
or in every group of M consecutive columns of a row (N:M). Shared by every method's rule,
SparseGPT's column walk included."""
from __future__ import annotations

import torch


def mask_lowest(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """Boolean mask of exactly round(ratio * numel) lowest entries of ``score``."""
    k = int(round(ratio * score.numel()))
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if k > 0:
        mask.index_fill_(0, torch.topk(score.reshape(-1), k, largest=False, sorted=False).indices, True)
    return mask.reshape(score.shape)


def lowest_in_rows(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """Column indices of the round(ratio * cols) lowest entries of every row."""
    k = int(round(ratio * score.shape[1]))
    return torch.topk(score, k, dim=1, largest=False, sorted=False).indices


def lowest_in_groups(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Column indices of the ``m - n`` lowest entries of every group of ``m`` consecutive
    columns of each row (rows x cols/m*(m-n))."""
    rows, cols = score.shape
    idx = torch.topk(score.reshape(rows, cols // m, m), m - n, dim=2, largest=False, sorted=False).indices
    return (idx + torch.arange(0, cols, m, device=score.device).view(1, -1, 1)).reshape(rows, -1)
