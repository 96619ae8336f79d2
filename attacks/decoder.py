"""Decoder inversion: learn an inverse network z -> x from the attacker's own images.

Threat model: white-box *query* access to the trained encoder (the attacker can run it on
images of its choice), knows the defense, in particular the channel noise, and owns images from
the data distribution (the harness records which split). The decoder is trained on pairs
(target.forward(x), x) queried afresh every epoch, so it sees new noise each time
("noise-aware"), as in the CEM paper's attack.

Reference (CEM paper / official code): a residual block to 64 channels, 8 residual blocks of
64, stride-2 transposed convolutions up to the image size, a residual block to 3 channels,
Sigmoid; Adam 1e-3, weight decay 1e-4, cosine to 1e-5, MSE loss, 50 epochs, batch 256.

Options (keyword-only, reference defaults):
    epochs=50, batch_size=256, lr=1e-3, min_lr=1e-5, weight_decay=1e-4,
    channels=64 (width; smaller is faster on a CPU), blocks=8,
    ensemble=1: train that many decoders from independent initialisations and average their
    reconstructions: a stronger attacker at `ensemble` times the training (docs/attacks.md).
Shapes: fit(target, images [N,C,H,W] in [0,1]); reconstruct(z [N,*z_shape]) -> [N,C,H,W] in [0,1].

Example:
    attack = registry.create("attack", "decoder", {"epochs": 5})
    attack.fit(target, images); x_hat = attack.reconstruct(target.query(x))
"""

from __future__ import annotations

import torch

from privbench.engine.inverse import InverseNet, train_inverse
from privbench.plugin.base import Attack, Target


class DecoderAttack(Attack):
    """Trains an inverse network on (noisy activation, image) pairs queried from the encoder."""

    name = "decoder"
    summary = "learned inverse network z -> x (noise-aware, white-box query access)"
    identity_omits = ("ensemble",)  # at its default, runs keep the hashes they had before the option existed

    def __init__(
        self,
        *,
        epochs: int = 50,
        batch_size: int = 256,
        lr: float = 1e-3,
        min_lr: float = 1e-5,
        weight_decay: float = 1e-4,
        channels: int = 64,
        blocks: int = 8,
        ensemble: int = 1,
    ):
        if epochs < 1 or batch_size < 1 or channels < 1 or blocks < 0 or ensemble < 1:
            raise ValueError("epochs, batch_size, channels and ensemble must be >= 1 and blocks >= 0")
        if lr <= 0 or min_lr < 0:
            raise ValueError("lr must be > 0 and min_lr >= 0")
        self.epochs, self.batch_size, self.lr, self.min_lr = epochs, batch_size, lr, min_lr
        self.weight_decay, self.channels, self.blocks, self.ensemble = weight_decay, channels, blocks, ensemble
        self.nets: list[InverseNet] = []
        self.history: list[float] = []  # mean training loss per epoch (every member's, one after another)

    @property
    def net(self) -> InverseNet | None:
        """The first (with ensemble=1 the only) decoder."""
        return self.nets[0] if self.nets else None

    def fit(self, target: Target, images: torch.Tensor) -> None:
        self.target = target
        self.nets = []
        for k in range(self.ensemble):  # each member draws its own initialisation and batch order
            net = InverseNet(target.z_shape(), target.image_shape, channels=self.channels, blocks=self.blocks)
            self.history += train_inverse(
                net.to(target.device),
                images,
                target.query,
                epochs=self.epochs,
                batch_size=self.batch_size,
                lr=self.lr,
                min_lr=self.min_lr,
                weight_decay=self.weight_decay,
                desc="decoder" if self.ensemble == 1 else f"decoder {k + 1}/{self.ensemble}",
                show=getattr(self, "progress", True),
            )
            self.nets.append(net)

    @torch.no_grad()
    def reconstruct(self, z: torch.Tensor) -> torch.Tensor:
        if not self.nets:
            raise RuntimeError("decoder: call fit(target, images) before reconstruct(z)")
        parts = [z[i : i + self.batch_size] for i in range(0, len(z), self.batch_size)]
        return torch.cat([torch.stack([net(part) for net in self.nets]).mean(0) for part in parts])
