"""Ridge inversion: the best *linear* map from activations back to pixels.

Threat model: query access to the encoder (noise included) and attacker images. It fits
x ~ W z + b by ridge regression on (target.query(x), x) pairs, so it sees the defense's
noise exactly as it is deployed. A cheap reference point between the mean-image baseline
and the learned decoder.

Options: ridge=1e-2 (added to the diagonal, relative to the mean feature variance).
"""

import torch

from privbench.plugins import Attack, Target


class RidgeAttack(Attack):
    name = "ridge"
    summary = "linear least-squares map z -> x (query access, noise-aware)"

    def __init__(self, *, ridge: float = 1e-2):
        if ridge < 0:
            raise ValueError("ridge must be >= 0")
        self.ridge = ridge

    def fit(self, target: Target, images: torch.Tensor) -> None:
        self.target = target
        z = target.query(images).flatten(1).double()
        x = images.flatten(1).double()
        self.z_mean, self.x_mean = z.mean(0), x.mean(0)
        z, x = z - self.z_mean, x - self.x_mean
        gram = z.T @ z
        gram += self.ridge * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
        self.weight = torch.linalg.solve(gram, z.T @ x)  # [z_dim, x_dim]

    def reconstruct(self, z: torch.Tensor) -> torch.Tensor:
        x = (z.flatten(1).double() - self.z_mean) @ self.weight + self.x_mean
        return x.float().clamp(0, 1).view(len(z), *self.target.image_shape)
