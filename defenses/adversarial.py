"""Adversarial representation learning: the encoder is trained against a simulated inversion attacker.

Papers: Li, Rakin, Chen, He, Fan, Chakrabarti, "ResSFL: A Resistance Transfer Framework for
Defending Model Inversion Attack in Split Federated Learning", CVPR 2022; Li, Guo, Liu, Wang,
Fang, "DeepObfuscator: Obfuscating Intermediate Representations with Privacy-Preserving
Adversarial Learning on Smartphones", IoTDI 2021 (arXiv 1909.04126). The official CEM code
(github.com/xiasong0501/CEM, `--AT_regularization gan_adv_step1`, built on ResSFL's code) has it
as a base defense. Our own code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from privbench.attack.metrics import SSIM_K1, SSIM_K2, SSIM_WINDOW, valid_filter_matrix
from privbench.engine.inverse import InverseNet
from privbench.errors import UserError
from privbench.plugin.base import Defense, TrainContext


def ssim_mean(x: torch.Tensor, y: torch.Tensor, gh: torch.Tensor, gw: torch.Tensor) -> torch.Tensor:
    """Mean SSIM of two image batches, differentiable: privbench.attack.metrics.ssim's formula with its
    filter matrices gh, gw built once (building them per call would copy host to device per step)."""
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    mx, my, mxx, myy, mxy = gh @ torch.stack([x, y, x * x, y * y, x * y]) @ gw.T
    vx, vy, cov = mxx - mx * mx, myy - my * my, mxy - mx * my
    return (((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))).mean()


class Adversarial(Defense):
    """Alternate an inversion decoder (the simulated attacker) with an encoder penalised by its success.

    What it does, per training step, inside `loss`: first `adv_steps` Adam steps of a decoder
    z -> x (privbench's InverseNet, the evaluated decoder attack's architecture) on the batch's
    detached z plus fresh channel noise, trained to maximise SSIM (loss 1 - SSIM) as the
    reference's is; then the decoder is frozen (eval mode, no parameter gradients) and the
    encoder is charged `weight * relu(SSIM(decoder(z + noise), x) - threshold)`: the SSIM of what
    the decoder rebuilds from the live z, over a hinge. Why this form: SSIM lies in [-1, 1], so
    the term is bounded and cannot dominate the cross-entropy or run away as -MSE or -log MSE
    can, pushing the encoder towards ever larger decoder errors (an inverted image has a large
    MSE and leaks everything); the hinge stops the pressure once the simulated attacker is below
    the threshold, so the encoder does not trade accuracy for privacy it already has. This is
    the official CEM code's form (gan_loss_type SSIM with ssim_threshold: alpha * (SSIM - 0.5)
    when SSIM > 0.5), whose run_exp.sh values are the defaults: weight 0.3, threshold 0.5, one
    decoder step per step (gan_adv_step1), Adam lr 1e-3. The decoder sees the channel noise
    (the reference's does not): privbench's attacker is noise-aware, so the simulated one is
    too. Differences: the decoder learns from the batch's z of the training step (encoder in
    train mode), not from a second encoder pass; its learning rate stays constant; and it is
    much narrower than the reference's (res_normN4C64: 64 channels, 4 blocks), width 12 and no
    middle blocks, so that an epoch of the quick preset costs under 2x an undefended one on a
    CPU (width 16 with one block measured 2.1-2.3x): `-o width=64 -o blocks=4` gives the
    reference's size. `adv_loss=mse` trains the decoder on MSE, as privbench's decoder attack.

    The decoder is built at setup (it needs the image shape as well as z's); its weights and
    Adam state are in `state_dict`, so a resumed run continues the same game. It is used in
    training only: the attacked model is the encoder alone, attacked afresh by the harness.

    Options (keyword-only; `-o key=value`):
        weight: the penalty weight, >= 0 (default 0.3); the strength: larger is more private.
        width: decoder channels, >= 1 (default 12).
        blocks: decoder residual blocks between its first block and the upsampling, >= 0 (default 0).
        adv_steps: decoder steps per training step, >= 1 (default 1).
        adv_lr: the decoder's Adam learning rate, > 0 (default 1e-3).
        threshold: the SSIM below which the encoder is not penalised, in [-1, 1) (default 0.5).
        adv_loss: the decoder's training loss, "ssim" (1 - SSIM, default) or "mse".

    Logged per epoch: adv_fit_loss (the decoder's training loss) and adv_ssim (its SSIM on the
    live z, which the hinge compares with the threshold).
    """

    name = "adversarial"
    summary = "encoder trained against an alternating inversion decoder (ResSFL / DeepObfuscator)"
    strength_grid = (0.1, 0.3, 1.0)
    knob = "weight"
    saved = ("decoder", "optimizer")  # built in setup: a state loaded before waits (restore_pending)

    def __init__(
        self,
        *,
        weight: float = 0.3,
        width: int = 12,
        blocks: int = 0,
        adv_steps: int = 1,
        adv_lr: float = 1e-3,
        threshold: float = 0.5,
        adv_loss: str = "ssim",
    ):
        if not weight >= 0:
            raise ValueError(f"invalid weight {weight}: the penalty weight must be >= 0")
        if int(width) != width or width < 1:
            raise ValueError(f"invalid width {width}: the decoder width must be an integer >= 1")
        if int(blocks) != blocks or blocks < 0:
            raise ValueError(f"invalid blocks {blocks}: need an integer >= 0")
        if int(adv_steps) != adv_steps or adv_steps < 1:
            raise ValueError(f"invalid adv_steps {adv_steps}: the decoder needs an integer >= 1 steps per step")
        if not adv_lr > 0 or not math.isfinite(adv_lr):
            raise ValueError(f"invalid adv_lr {adv_lr}: the decoder's learning rate must be > 0")
        if not -1 <= threshold < 1:
            raise ValueError(f"invalid threshold {threshold}: an SSIM threshold must be in [-1, 1)")
        if adv_loss not in ("ssim", "mse"):
            raise ValueError(f"invalid adv_loss {adv_loss!r}: ssim or mse")
        self.weight, self.width, self.blocks = float(weight), int(width), int(blocks)
        self.adv_steps, self.adv_lr, self.threshold = int(adv_steps), float(adv_lr), float(threshold)
        self.adv_loss = adv_loss
        self.z_shape: tuple[int, ...] | None = None
        self.decoder: InverseNet | None = None
        self.optimizer: torch.optim.Adam | None = None
        self.noise_std = 0.0
        self._filters: tuple[torch.Tensor, torch.Tensor] | None = None  # SSIM's Gaussian filter matrices
        self._sums: torch.Tensor | None = None  # [adv_fit_loss, adv_ssim] summed over the epoch's steps
        self._steps = 0

    def build(self, z_shape: tuple[int, ...], device: torch.device) -> None:
        self.z_shape = tuple(z_shape)

    def setup(self, ctx: TrainContext) -> None:
        if self.z_shape is None:
            raise UserError("adversarial: build(z_shape, device) must run before setup")
        image_shape = tuple(ctx.train_images.shape[1:])
        if min(image_shape[1:]) < SSIM_WINDOW:
            raise UserError(f"adversarial needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels (SSIM)")
        self.noise_std = float(ctx.noise_std)
        self.decoder = InverseNet(self.z_shape, image_shape, channels=self.width, blocks=self.blocks).to(ctx.device)
        self.optimizer = torch.optim.Adam(self.decoder.parameters(), lr=self.adv_lr)
        h, w = image_shape[1:]
        self._filters = (valid_filter_matrix(h, ctx.device), valid_filter_matrix(w, ctx.device))
        self._sums = torch.zeros(2, device=ctx.device)
        self._steps = 0
        self.restore_pending()  # a state loaded before setup built the decoder and its optimizer

    def _noisy(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.noise_std * torch.randn_like(z) if self.noise_std > 0 else z

    def loss(
        self, z: torch.Tensor, y: torch.Tensor, *, epoch: int, lr: float, x: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        if self.weight == 0:
            return None
        if x is None:
            raise RuntimeError("adversarial needs the input images: the training loop must pass x= to loss")
        dec, opt = self.decoder, self.optimizer
        assert dec is not None and opt is not None and self._sums is not None and self._filters is not None, (
            "setup(ctx) runs before loss"
        )
        target = x.float()
        # 1. The attacker's turn: its own steps on a detached z (no gradient reaches the encoder).
        dec.train()
        dec.requires_grad_(True)
        zd = z.detach()
        with torch.enable_grad():
            for _ in range(self.adv_steps):
                out = dec(self._noisy(zd)).float()
                with torch.autocast(z.device.type, enabled=False):
                    fit = (
                        1 - ssim_mean(out, target, *self._filters)
                        if self.adv_loss == "ssim"
                        else F.mse_loss(out, target)
                    )
                opt.zero_grad(set_to_none=True)
                fit.backward()
                opt.step()
        opt.zero_grad(set_to_none=True)  # free the gradients; the main backward adds none (below)
        # 2. The encoder's turn: the frozen decoder's SSIM on the live z, over the hinge.
        dec.eval()
        dec.requires_grad_(False)  # the main backward needs gradients w.r.t. z only
        rec = dec(self._noisy(z))
        with torch.autocast(z.device.type, enabled=False):
            s = ssim_mean(rec.float(), target, *self._filters)
        self._sums += torch.stack([fit.detach().float(), s.detach()])
        self._steps += 1
        return self.weight * F.relu(s - self.threshold)

    def epoch_end(self, epoch: int, ctx: TrainContext) -> dict[str, float]:
        if self._sums is None or self._steps == 0:
            return {}
        fit, s = (self._sums / self._steps).tolist()  # one sync per epoch
        self._sums.zero_()
        self._steps = 0
        return {"adv_fit_loss": fit, "adv_ssim": s}
