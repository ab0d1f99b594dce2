"""EfficientTrain-style curriculum (Wang et al., "EfficientTrain: Exploring Generalized Curriculum
Learning for Training Visual Backbones", ICCV 2023): easier-to-learn, low-frequency inputs first, the
full signal later, and augmentation that grows stronger over training.

* **Low-pass in the Fourier domain.** Each image's 2-D spectrum is cropped to its central (lowest-
  frequency) ``bandwidth`` fraction along each axis and transformed back. The bandwidth grows linearly
  from ``start_bandwidth`` to 1 over the first ``ramp`` fraction of training (measured in micro-batches,
  so it moves every step), then stays at 1. At bandwidth 1 the inputs are untouched (exact identity).
  EfficientTrain also *downsamples* the cropped spectrum to a smaller image to save compute; models here
  take a fixed input size, so the image keeps its size and only the curriculum effect is reproduced, not
  the speed-up from smaller inputs.
* **Augmentation growing over training.** The augmentation *strength* ``a`` grows linearly from
  ``augment_start`` to 1 over the first ``augment_ramp`` fraction of training (EfficientTrain grows its
  RandAugment magnitude the same way); each augmentation is scaled by it:

  - ``max_shift: s`` — random translation by up to ``round(s * a)`` pixels (zeros shifted in);
  - ``max_flip: p`` — horizontal flip with probability ``p * a``;
  - ``max_noise: σ`` — additive Gaussian noise of standard deviation ``σ * a`` (input units).

  With the default ``augment_start: 0`` there is no augmentation at the first step and the full
  strength at the end. All draws use the trainer's per-step RNG, so resume stays exact.

``keep`` < 1 additionally trains on a random ``keep`` fraction of each epoch, as ``uniform`` does, so
the curriculum can be compared with the other selectors at a matched budget. The teacher (distill
stages) and scoring selectors see the unfiltered inputs; the student trains on the filtered ones.
"""

from __future__ import annotations

import torch
from pydantic import Field

from attar.data.transforms import crop_at
from attar.errors import AttarError
from attar.select.base import SELECTORS, SelectorParams, Uniform
from attar.train.objective import Batch


def low_pass(x: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """Keep the central ``bandwidth`` fraction of each image's 2-D spectrum (per axis); zero the rest.

    ``x`` is [N, C, H, W]. ``bandwidth >= 1`` returns ``x`` itself. The mask is symmetric in frequency,
    so the result is real (the imaginary round-off is dropped)."""
    if bandwidth >= 1.0:
        return x
    h, w = x.shape[-2:]
    fy = torch.fft.fftfreq(h, device=x.device).abs()
    fx = torch.fft.fftfreq(w, device=x.device).abs()
    # keep |f| <= bandwidth / 2 cycles per pixel along each axis (the DC term always survives)
    mask = (fy[:, None] <= bandwidth / 2 + 1e-9) & (fx[None, :] <= bandwidth / 2 + 1e-9)
    spec = torch.fft.fft2(x.float())
    return torch.fft.ifft2(spec * mask).real.to(x.dtype)


def random_shift(x: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Translate each image by its own random (dy, dx) in [-max_shift, max_shift], zeros shifted in."""
    if max_shift <= 0:
        return x

    n = x.shape[0]
    offsets = torch.randint(0, 2 * max_shift + 1, (2, n))  # the trainer's per-step global RNG
    return crop_at(x, max_shift, offsets)


def random_flip(x: torch.Tensor, p: float) -> torch.Tensor:
    """Mirror each image left-right with probability ``p`` (one draw per image)."""
    if p <= 0:
        return x
    flip = (torch.rand(x.shape[0]) < p).to(x.device)  # the trainer's per-step global RNG
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def gaussian_noise(x: torch.Tensor, std: float) -> torch.Tensor:
    """``x`` plus i.i.d. Gaussian noise of standard deviation ``std``."""
    if std <= 0:
        return x
    return x + std * torch.randn(x.shape).to(x.device, x.dtype)


class EfficientTrainParams(SelectorParams):
    start_bandwidth: float = Field(0.5, gt=0, le=1, description="fraction of frequencies kept (per axis) at the start")
    ramp: float = Field(0.6, gt=0, le=1, description="fraction of training after which the full spectrum is used")
    max_shift: int = Field(0, ge=0, description="random translation (pixels) reached at full strength; 0 = off")
    max_flip: float = Field(0.0, ge=0, le=1, description="horizontal-flip probability reached at full strength; 0 = off")
    max_noise: float = Field(0.0, ge=0, description="Gaussian-noise std (input units) reached at full strength; 0 = off")
    augment_start: float = Field(0.0, ge=0, le=1, description="augmentation strength at the first step (1 = full)")
    augment_ramp: float = Field(1.0, gt=0, le=1, description="fraction of training after which augmentation is at full strength")


@SELECTORS.register("efficienttrain")
class EfficientTrain(Uniform):
    """Low-frequency-first curriculum with augmentation growing over training."""

    Params = EfficientTrainParams

    def bandwidth(self) -> float:
        p = self.p
        return min(1.0, p.start_bandwidth + (1.0 - p.start_bandwidth) * self.progress() / p.ramp)

    def strength(self) -> float:
        """Augmentation strength in [0, 1]: ``augment_start`` at the first step, 1 after ``augment_ramp``."""
        p = self.p
        return min(1.0, p.augment_start + (1.0 - p.augment_start) * self.progress() / p.augment_ramp)

    def augmentation(self) -> dict[str, float]:
        """The augmentation applied at the current step: shift (pixels), flip probability, noise std."""
        a, p = self.strength(), self.p
        return {"shift": round(p.max_shift * a), "flip": p.max_flip * a, "noise": p.max_noise * a}

    def check(self, *, stage=None, objective=None, input_shape=None, labels=None) -> None:
        if input_shape is not None and len(input_shape) != 3:
            raise AttarError(f"selector 'efficienttrain' filters images (channels, height, width); the stage's inputs "
                             f"have shape {tuple(input_shape)}. Use it on image data, or pick uniform/rs2.")

    def transform(self, batch: Batch) -> Batch:
        x = batch.x
        if x.dim() != 4:
            raise AttarError(f"selector 'efficienttrain' filters images [N, C, H, W]; got inputs of shape "
                             f"{tuple(x.shape)}.")
        x = low_pass(x, self.bandwidth())
        aug = self.augmentation()
        x = random_shift(x, aug["shift"])
        x = random_flip(x, aug["flip"])
        x = gaussian_noise(x, aug["noise"])
        if x is batch.x:
            return batch
        return Batch(x=x, y=batch.y, idx=batch.idx, teacher_logits=batch.teacher_logits)
