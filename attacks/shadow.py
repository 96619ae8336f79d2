"""Shadow-model inversion: a query-free attack by a curious server.

Threat model (He et al. 2019, "Model inversion attacks against collaborative inference",
query-free setting): the attacker is the server. It owns the trained server half (frozen, never
changed) and observes the activations z the client sends, but it can never run the client's
encoder: no queries, no gradients, no weights (this attack never calls `target.encoder`,
`target.forward` or `target.query`). It knows what is public: the encoder's architecture, the
defense's transform and channel noise, and it owns labelled images of the data distribution.

Attack: (1) a shadow encoder of the encoder's architecture (a deep copy of its structure with
every parameter re-initialised, so nothing of the trained weights survives) is trained so that
the frozen server, fed the shadow's output after the defense's transform and the channel noise,
classifies the attacker's images correctly: the server pins the meaning of every z channel, so
the shadow learns to speak the encoder's language. (2) An inverse network (the `decoder`
attack's InverseNet) is trained on (noisy shadow output, image) pairs with fresh noise each
epoch. (3) It is applied to the observed z. Without labels (`fit` called without them) step (1)
uses information maximisation instead (confident and class-balanced server outputs, SHOT,
Liang et al. 2020); `info` records which.

The server alone pins the shadow loosely: many codes make a frozen server classify correctly,
and a shadow trained on classification only lands in a different code space on some seeds
(measured: SSIM from below the mean image to well above it, seed to seed). So step (1) also
matches, at every batch-norm layer of the server, the batch statistics of the shadow's code to
the running statistics that the server kept while it was trained on the real encoder's codes
(a feature-statistics prior, as in DeepInversion, Yin et al. 2020): the server owns them, so the
attack stays query-free. `bn_weight` (default 1; 0 turns it off) weighs that term.

Options (keyword-only): epochs=50 (each phase; the budget the presets set), shadow_epochs=0
(0: the same as epochs), shadow_lr=1e-3, batch_size=64 (shadow phase), bn_weight=1.0, and the inverse
network's, at the `decoder` attack's reference defaults (CEM paper / official code):
decoder_batch_size=256, lr=1e-3, min_lr=1e-5, weight_decay=1e-4, channels=64, blocks=8.
He et al. train the shadow as the original model was trained; Adam 1e-3 was picked here.
Shapes: fit(target, images [N,C,H,W], labels [N]); reconstruct(z [N,*z_shape]) -> [N,C,H,W].
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from privbench.engine.inverse import InverseNet, train_inverse
from privbench.errors import UserError
from privbench.plugin.base import Attack, Target
from privbench.util.progress import bar as progress_bar

THREAT_MODEL = (
    "query-free curious server: owns the frozen server half and the observed z, never queries, "
    "differentiates or reads the client encoder; knows its architecture, the defense's transform "
    "and noise, and owns labelled attacker images"
)


def reinitialised_copy(module: nn.Module) -> nn.Module:
    """The same architecture with fresh parameters: deep copy, then reset every submodule that
    can reset itself; any other parameter gets a fresh small random value, so no trained weight is kept."""
    shadow = copy.deepcopy(module)
    reset: set[int] = set()
    for m in shadow.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
            reset |= {id(p) for p in m.parameters(recurse=False)}
    with torch.no_grad():
        for p in shadow.parameters():
            if id(p) not in reset:
                p.copy_(torch.randn_like(p) * 0.02 if p.ndim > 1 else torch.zeros_like(p))
    return shadow.requires_grad_(True)


def _stat_gap(gaps: list[torch.Tensor]):
    """A forward hook that appends how far a batch-norm layer's input batch is from the layer's
    running statistics, scale-free: squared mean gap over the running variance, plus the squared
    log ratio of the variances, averaged over channels."""

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        h = inputs[0].float()
        dims = [d for d in range(h.ndim) if d != 1]
        mean, var = h.mean(dims), h.var(dims, unbiased=False)
        rv = module.running_var.float() + module.eps
        shift = ((mean - module.running_mean.float()) ** 2 / rv).mean()
        gaps.append(shift + ((var + module.eps) / rv).log().pow(2).mean())

    return hook


class ShadowAttack(Attack):
    """Shadow encoder trained through the frozen server, then an inverse network on the shadow."""

    name = "shadow"
    summary = "query-free: shadow encoder trained through the frozen server half, inverse net on it"
    queries_encoder = False

    def __init__(
        self,
        *,
        epochs: int = 50,
        shadow_epochs: int = 0,
        shadow_lr: float = 1e-3,
        batch_size: int = 64,
        bn_weight: float = 1.0,
        decoder_batch_size: int = 256,
        lr: float = 1e-3,
        min_lr: float = 1e-5,
        weight_decay: float = 1e-4,
        channels: int = 64,
        blocks: int = 8,
    ):
        if epochs < 1 or shadow_epochs < 0 or batch_size < 1 or decoder_batch_size < 1:
            raise ValueError("epochs, batch_size and decoder_batch_size must be >= 1 and shadow_epochs >= 0")
        if channels < 1 or blocks < 0:
            raise ValueError("channels must be >= 1 and blocks >= 0")
        if shadow_lr <= 0 or lr <= 0 or min_lr < 0 or weight_decay < 0 or bn_weight < 0:
            raise ValueError("shadow_lr and lr must be > 0, min_lr, weight_decay and bn_weight >= 0")
        self.bn_weight = bn_weight
        self.epochs, self.shadow_epochs, self.shadow_lr, self.batch_size = epochs, shadow_epochs, shadow_lr, batch_size
        self.decoder_batch_size, self.lr, self.min_lr, self.weight_decay = decoder_batch_size, lr, min_lr, weight_decay
        self.channels, self.blocks = channels, blocks
        self.shadow: nn.Module | None = None
        self.net: InverseNet | None = None
        self.history: dict[str, list[float]] = {"shadow": [], "accuracy": [], "inverse": []}
        self._bn_layers = 0
        self.info: dict = {}

    def _sent(self, x: torch.Tensor) -> torch.Tensor:
        """What the server would receive if the client ran the shadow: transform, then channel noise."""
        z = self.shadow(x)
        if self.target.transform is not None:
            z = self.target.transform(z)
        return z + self.target.noise_std * torch.randn_like(z) if self.target.noise_std > 0 else z

    def fit(self, target: Target, images: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        self.target = target
        if target.server is None:
            raise UserError("shadow: the target has no server half, which this attack's threat model needs")
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"shadow: {len(labels)} labels for {len(images)} images")
        show = getattr(self, "progress", True)
        self.shadow = reinitialised_copy(target.encoder).to(images.device)
        self._train_shadow(images, labels, show)
        self.shadow.eval().requires_grad_(False)
        with torch.no_grad():
            z_shape = tuple(self._sent(images[:1]).shape[1:])
        self.net = InverseNet(z_shape, target.image_shape, channels=self.channels, blocks=self.blocks)
        self._train_inverse(images, show)
        objective = "cross-entropy on attacker labels" if labels is not None else "information maximisation"
        accuracy = self.history["accuracy"][-1] if self.history["accuracy"] else None
        self.info = {
            "query_free": True,
            "threat_model": THREAT_MODEL,
            "shadow_objective": objective,
            "shadow_server_accuracy": accuracy,
            "bn_weight": self.bn_weight,
            "bn_layers_matched": self._bn_layers,
        }

    def _train_shadow(self, images: torch.Tensor, labels: torch.Tensor | None, show: bool) -> None:
        server, shadow = self.target.server, self.shadow.train()
        opt = torch.optim.Adam(shadow.parameters(), lr=self.shadow_lr)
        epochs = self.shadow_epochs or self.epochs
        gaps: list[torch.Tensor] = []
        norms = (
            [
                m
                for m in server.modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
            ]
            if self.bn_weight > 0
            else []
        )
        hooks = [m.register_forward_hook(_stat_gap(gaps)) for m in norms]
        self._bn_layers = len(hooks)
        bar = progress_bar(range(epochs), desc="shadow encoder", show=show)
        try:
            self._shadow_epochs(server, shadow, opt, images, labels, gaps, bar)
        finally:
            for h in hooks:
                h.remove()

    def _shadow_epochs(self, server, shadow, opt, images, labels, gaps, bar) -> None:
        for _ in bar:
            perm = torch.randperm(len(images), device=images.device)
            total = torch.zeros((), device=images.device)
            correct = torch.zeros((), device=images.device)
            for i in range(0, len(images), self.batch_size):
                idx = perm[i : i + self.batch_size]
                gaps.clear()
                logits = server(self._sent(images[idx]))  # server frozen and in eval mode: only the shadow learns
                if labels is not None:
                    y = labels[idx]
                    loss = F.cross_entropy(logits, y)
                    correct += (logits.argmax(1) == y).sum()
                else:  # information maximisation: each output confident, all classes used
                    p = logits.softmax(1)
                    mean = p.mean(0)
                    loss = -(p * p.clamp_min(1e-8).log()).sum(1).mean() + (mean * mean.clamp_min(1e-8).log()).sum()
                if gaps:
                    loss = loss + self.bn_weight * torch.stack(gaps).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.detach() * len(idx)
            self.history["shadow"].append(total.item() / len(images))
            if labels is not None:
                self.history["accuracy"].append(correct.item() / len(images))
            bar.set_postfix(loss=f"{self.history['shadow'][-1]:.3f}")

    def _train_inverse(self, images: torch.Tensor, show: bool) -> None:
        self.history["inverse"] += train_inverse(
            self.net.to(images.device),
            images,
            torch.no_grad()(self._sent),
            epochs=self.epochs,
            batch_size=self.decoder_batch_size,
            lr=self.lr,
            min_lr=self.min_lr,
            weight_decay=self.weight_decay,
            desc="shadow inverse",
            show=show,
        )

    @torch.no_grad()
    def reconstruct(self, z: torch.Tensor) -> torch.Tensor:
        if self.net is None:
            raise RuntimeError("shadow: call fit(target, images, labels) before reconstruct(z)")
        step = self.decoder_batch_size
        return torch.cat([self.net(z[i : i + step]) for i in range(0, len(z), step)])
