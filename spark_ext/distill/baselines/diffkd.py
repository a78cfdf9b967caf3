"""DiffKD: feature distillation through a diffusion denoiser (after Huang et al. 2023, arXiv 2305.15712).

Idea: a student feature is a *noisy* version of the teacher's, so a diffusion
model trained on teacher features can denoise it before it is matched to the
teacher. At the module called ``layer`` (hooked in the student and the
teachers, as DFD does):

1. a linear autoencoder (1x1 convs) compresses the teacher feature
   ``F_t [B, C_t, H, W]`` to ``z_t = enc(F_t) [B, d, H, W]``, trained by
   ``L_ae = mean (dec(z_t) - F_t)^2``; a 1x1 conv projects the student feature
   ``F_s [B, C_s, H, W]`` to ``z_s [B, d, H, W]`` (both features are first divided by the
   teacher feature's RMS over the batch, detached, so the latents have about unit scale);
2. a small noise-prediction network ``eps(x, t)`` learns the DDPM noise loss on
   ``sg(z_t)``: ``L_diff = mean (eps(sqrt(ab_t) z_t + sqrt(1 - ab_t) n, t) - n)^2``
   with ``t`` uniform over the schedule and ``n ~ N(0, I)`` (private generator);
3. adaptive noise matching: a small head predicts, per sample, ``gamma in (0, 1)``
   from ``z_s``, and the student latent is treated as a noisy teacher latent
   at the sampler's first step: ``x = gamma z_s + (1 - gamma) n``;
4. ``sample_steps`` deterministic DDIM steps (eta = 0) from ``start_step`` to 0
   denoise ``x`` to ``z_hat``; the KD loss is ``mean (z_hat - sg(z_t))^2``
   (cell-weighted by SPARK's weight map when one is given).

Choices where the paper leaves room (docs/diffkd.md): the KD gradient reaches
the student, its projection and the noise-matching head, but not the noise
network (it sees its parameters detached there, so it learns teacher features
only) nor the encoder (``z_t`` is a stop-gradient target, so the encoder
cannot shrink the latent to make KD trivial). The DiffKD modules are trained by
their own Adam on ``L_ae + L_diff + KD`` (the KD part only reaches the
projection and the gamma head). Everything random uses a private generator,
so a checkpoint (:meth:`DiffKD.state_dict`) resumes bitwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from ..._validation import check_int, check_real
from ...ops import fused_weighted_kd
from .dfd import DecoderFreeDistillation


def ddpm_alpha_bar(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Cumulative products ``alpha_bar_t`` of the linear DDPM schedule: ``[num_steps]`` float32, decreasing."""
    betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, 0).float()


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps ``t [B]`` -> ``[B, dim]`` float32 (dim even)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], 1)


class NoiseNet(nn.Module):
    """``eps(x [B, d, H, W], t [B]) -> [B, d, H, W]``: two 3x3 convs with a timestep bias, a 1x1 output conv."""

    def __init__(self, channels: int, hidden: int = 32, time_dim: int = 16):
        super().__init__()
        self.time_dim = time_dim
        self.time = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.conv_in = nn.Conv2d(channels, hidden, 3, padding=1)
        self.conv_mid = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.conv_out = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(x) + self.time(timestep_embedding(t, self.time_dim))[:, :, None, None])
        return self.conv_out(F.silu(self.conv_mid(h)))


class NoiseMatcher(nn.Module):
    """Adaptive noise matching: ``gamma [B, 1, 1, 1]`` in (0, 1) from a global pool of ``z_s``."""

    def __init__(self, channels: int, hidden: int = 16):
        super().__init__()
        self.head = nn.Sequential(nn.Linear(channels, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.head[2].weight)
        nn.init.constant_(self.head[2].bias, 2.0)  # start near gamma = 0.88: mostly the student feature

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.head(z.mean((2, 3))))[:, :, None, None]


class DiffKDModules(nn.Module):
    """The learnable parts of DiffKD: teacher autoencoder, student projection, noise net, noise matcher."""

    def __init__(self, teacher_channels: int, student_channels: int, latent: int, hidden: int):
        super().__init__()
        self.encoder = nn.Conv2d(teacher_channels, latent, 1)
        self.decoder = nn.Conv2d(latent, teacher_channels, 1)
        self.project = nn.Conv2d(student_channels, latent, 1)
        self.noise_net = NoiseNet(latent, hidden)
        self.matcher = NoiseMatcher(latent)


class DiffKD(DecoderFreeDistillation):
    """DiffKD at the module called ``layer`` (a drop-in for :class:`DecoderFreeDistillation` in the trainer).

    Args:
        student, teachers, layer: as for DFD (teachers' features are averaged).
        latent: autoencoder latent channels ``d`` (None: ``min(C_t, 16)``).
        hidden: noise-net width.
        num_steps: DDPM schedule length; start_step: the step (``< num_steps``)
            at which the student latent enters the sampler; sample_steps: DDIM steps.
        lr: Adam learning rate of the DiffKD modules.
        seed: seeds the modules' initialisation (global RNG untouched) and the private noise generator.

    The modules are built lazily on the first :meth:`loss` (channel counts are
    only known then). Per step: :meth:`loss` returns the KD term (differentiable
    w.r.t. the student feature) and records :attr:`aux_loss` (``L_ae + L_diff``,
    to be added to the total loss) and :meth:`stats`; after ``backward`` call
    :meth:`optimizer_step`.
    """

    def __init__(
        self,
        student: nn.Module,
        teachers: Sequence[nn.Module],
        layer: str,
        *,
        latent: Optional[int] = None,
        hidden: int = 32,
        num_steps: int = 1000,
        start_step: int = 500,
        sample_steps: int = 5,
        lr: float = 1e-3,
        seed: int = 0,
    ):
        super().__init__(student, teachers, layer)
        self.latent = None if latent is None else check_int(latent, "latent")
        self.hidden = check_int(hidden, "hidden")
        self.num_steps = check_int(num_steps, "num_steps")
        self.start_step = check_int(start_step, "start_step")
        self.sample_steps = check_int(sample_steps, "sample_steps")
        if self.latent is not None and self.latent < 1 or self.hidden < 1:
            raise ValueError(f"latent and hidden must be >= 1, got {latent}, {hidden}")
        if not 0 < self.start_step < self.num_steps:
            raise ValueError(f"start_step must be in (0, num_steps={num_steps}), got {start_step}")
        if not 1 <= self.sample_steps <= self.start_step:
            raise ValueError(f"sample_steps must be in [1, start_step={start_step}], got {sample_steps}")
        self.lr = check_real(lr, "lr")
        self.seed = check_int(seed, "seed")
        self.modules: Optional[DiffKDModules] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.generator: Optional[torch.Generator] = None
        self.alpha_bar = ddpm_alpha_bar(self.num_steps)
        self.aux_loss: Optional[torch.Tensor] = None
        self._stats: dict[str, torch.Tensor] = {}
        self._pending_state: Optional[dict] = None

    # ----------------------------------------------------------------- build

    def _build(self, f_s: torch.Tensor, f_t: torch.Tensor) -> None:
        latent = self.latent or min(f_t.shape[1], 16)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.modules = DiffKDModules(f_t.shape[1], f_s.shape[1], latent, self.hidden).to(f_s.device)
        self.optimizer = torch.optim.Adam(self.modules.parameters(), lr=self.lr)
        self.generator = torch.Generator(device=f_s.device).manual_seed(self.seed)
        self.alpha_bar = self.alpha_bar.to(f_s.device)
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self.load_state_dict(state)

    # ------------------------------------------------------------- diffusion

    def _noise(self, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, generator=self.generator, device=like.device, dtype=like.dtype)

    def diffusion_loss(self, z_t: torch.Tensor) -> torch.Tensor:
        """DDPM noise-prediction loss on (detached) teacher latents ``z_t [B, d, H, W]``: 0-D float32."""
        t = torch.randint(0, self.num_steps, (z_t.shape[0],), generator=self.generator, device=z_t.device)
        n = self._noise(z_t)
        ab = self.alpha_bar[t][:, None, None, None]
        x_t = ab.sqrt() * z_t + (1 - ab).sqrt() * n
        return F.mse_loss(self.modules.noise_net(x_t, t), n)

    def ddim_denoise(self, x: torch.Tensor, noise_net_params: Optional[dict] = None) -> torch.Tensor:
        """Deterministic DDIM (eta = 0) from ``start_step`` to 0 in ``sample_steps`` steps: ``x -> z_hat``.

        ``noise_net_params``: parameters to run the noise net with (e.g. detached ones); default its own."""
        net = self.modules.noise_net
        params = noise_net_params if noise_net_params is not None else dict(net.named_parameters())
        steps = torch.linspace(self.start_step, 0, self.sample_steps + 1).round().long().tolist()
        for t_now, t_next in zip(steps[:-1], steps[1:]):
            tt = torch.full((x.shape[0],), t_now, device=x.device, dtype=torch.long)
            eps = functional_call(net, params, (x, tt))
            ab = self.alpha_bar[t_now]
            ab_next = self.alpha_bar[t_next] if t_next > 0 else torch.ones((), device=x.device)
            x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
            x = x0 if t_next == 0 else ab_next.sqrt() * x0 + (1 - ab_next).sqrt() * eps
        return x

    def denoise_student(self, f_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Project, noise-match and denoise a student feature: ``(z_hat [B, d, H, W], gamma [B, 1, 1, 1])``.

        Differentiable w.r.t. ``f_s``, the projection and the noise matcher; the noise net's parameters are detached."""
        z_s = self.modules.project(f_s)
        gamma = self.modules.matcher(z_s)
        x = gamma * z_s + (1 - gamma) * self._noise(z_s)
        frozen = {k: v.detach() for k, v in self.modules.noise_net.named_parameters()}
        return self.ddim_denoise(x, frozen), gamma

    # ------------------------------------------------------------------ loss

    def loss(
        self, teacher_features: torch.Tensor, weight: Optional[torch.Tensor] = None, backend: Optional[str] = None
    ) -> torch.Tensor:
        """KD on the denoised student latent, ``mean (z_hat - sg(z_t))^2`` (optionally cell-weighted): 0-D float32.

        Also sets :attr:`aux_loss` (``L_ae + L_diff``) and the values of :meth:`stats`."""
        f_s = self.student_tap.take()
        if f_s.dtype in (torch.float16, torch.bfloat16):  # under autocast: the float32 modules need float32
            f_s = f_s.float()
        if (
            f_s.dim() != 4
            or teacher_features.dim() != 4
            or f_s.shape[-2:] != teacher_features.shape[-2:]
            or f_s.shape[0] != teacher_features.shape[0]
        ):
            raise ValueError(
                f"diffkd layer {self.layer!r}: student features {tuple(f_s.shape)} and teacher features "
                f"{tuple(teacher_features.shape)} must be [B, C, H, W] with the same B, H, W (channels may differ)"
            )
        f_t = teacher_features.to(f_s.dtype).detach()
        # Diffusion assumes data of about unit scale: both features are divided by the teacher
        # feature's RMS (a detached per-batch scalar), which leaves the KD target scale-free.
        scale = f_t.pow(2).mean().sqrt().clamp_min(1e-8)
        f_t, f_s = f_t / scale, f_s / scale
        if self.modules is None:
            self._build(f_s, f_t)
        z_t = self.modules.encoder(f_t)
        l_ae = F.mse_loss(self.modules.decoder(z_t), f_t)
        target = z_t.detach()
        l_diff = self.diffusion_loss(target)
        z_hat, gamma = self.denoise_student(f_s)
        kd = fused_weighted_kd(z_hat, target, weight, kd_loss="l2", reduction="mean", backend=backend)
        self.aux_loss = l_ae + l_diff
        with torch.no_grad():
            raw = F.mse_loss(self.modules.project(f_s), target)
        self._stats = {
            "diffkd_ae": l_ae.detach(),
            "diffkd_diffusion": l_diff.detach(),
            "diffkd_kd": kd.detach(),
            "diffkd_kd_undenoised": raw,
            "diffkd_gamma": gamma.detach().mean(),
        }
        return kd

    def stats(self) -> dict[str, torch.Tensor]:
        """The last step's ``diffkd_*`` scalars (0-D tensors) for the trainer's log."""
        return dict(self._stats)

    def zero_grad(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)

    def optimizer_step(self) -> None:
        """One Adam step of the DiffKD modules (after the total loss's backward); none when a gradient is not
        finite (fp16 gradients a GradScaler found overflowing: it unscales only the student's optimiser)."""
        if self.optimizer is None:
            return
        grads = [p.grad for p in self.modules.parameters() if p.grad is not None]
        if grads and bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            self.optimizer.step()

    # ------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict:
        """Modules, their optimiser and the private generator (empty before the first step)."""
        if self.modules is None:
            return {} if self._pending_state is None else self._pending_state
        return {
            "modules": self.modules.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; applied at build time if the modules do not exist yet. The empty
        state (taken before the first step) makes the modules unbuilt again: the next step builds them
        afresh from the seed, as in a new run."""
        if not state:
            self.modules = self.optimizer = self.generator = self._pending_state = None
            return
        if self.modules is None:
            self._pending_state = state
            return
        self.modules.load_state_dict(state["modules"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["rng"])
