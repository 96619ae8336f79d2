"""Statistics of the activation z that defenses shape: clean features and class spread."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from privbench.engine.data import to_float


@torch.no_grad()
def encoder_features(encoder: nn.Module, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Clean features of uint8 images: eval mode, no noise, no augmentation, flattened [N, D].

    The encoder's train/eval mode is restored afterwards.
    """
    was_training = encoder.training
    encoder.eval()
    try:
        out = [
            encoder(to_float(images[i : i + batch_size])).float().flatten(1) for i in range(0, len(images), batch_size)
        ]
    finally:
        encoder.train(was_training)
    return torch.cat(out)


def intra_class_mse(z: torch.Tensor, y: torch.Tensor, num_classes: int, *, per_class: bool = False) -> torch.Tensor:
    """Mean over samples and dimensions of (z - class mean)^2 (z: [n, D]); per class: [C]."""
    onehot = F.one_hot(y, num_classes).to(z.dtype)
    counts = onehot.sum(0)
    mean = (onehot.T @ z) / counts.clamp(min=1)[:, None]
    sq = (z - mean[y]).pow(2).mean(1)  # [n]
    if per_class:
        return (onehot.T @ sq) / counts.clamp(min=1)
    return sq.mean()


def z_spread(encoder: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Intra-class and total variance of clean z (mean over samples and dimensions).

    CEM's claim is behavioural: the intra-class spread falls. The total variance beside it
    shows whether the whole scale of z shrank rather than the classes tightening.
    """
    z = encoder_features(encoder, images)
    return {
        "z_intra_class_var": intra_class_mse(z, labels, num_classes).item(),
        "z_total_var": (z - z.mean(0)).pow(2).mean().item(),
    }
