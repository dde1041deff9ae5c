"""Distillation losses: plain KL, cross-entropy, and our Deviation-Aware Distillation (DAD).

DB-LLM's DAD re-weights the per-token distillation loss by an ambiguity signal from teacher and
student entropy; the paper does not publish the formula. Ours, **DAD-ED** (entropy-deviation
weighting), is defined per token ``t`` with teacher distribution ``p_t``, student ``q_t`` over a
vocabulary of size ``V``:

    H_T(t) = H(p_t) / log V,      H_S(t) = H(q_t) / log V                (normalised entropies, in [0, 1])
    a_t    = H_T(t) + |H_S(t) - H_T(t)|                                   (ambiguity + deviation)
    w_t    = a_t ** gamma / mean_t'(a_t' ** gamma)                         (mean 1 over the tokens of the batch)
    loss   = mean_t [ (1 - lam) + lam * w_t ] * KL(p_t || q_t)

- ``H_T`` is large where the next token is genuinely ambiguous (the paper's "ambiguous samples");
  ``|H_S - H_T|`` is large where the student's confidence has drifted from the teacher's — the
  low-bit distortion toward over- or under-confident predictions.
- The weights are computed without gradient (they steer the loss, they are not optimised) and
  normalised to mean 1, so ``lam`` trades plain KL (``lam = 0``) against pure re-weighting
  (``lam = 1``) without changing the loss scale. Defaults: ``gamma = 1``, ``lam = 0.5``.
- Padding tokens (``mask == 0``) get weight 0 and do not enter the mean.

All losses take logits ``[..., V]`` and work in float32 whatever the input dtype. Teacher logits
are computed per micro-batch by the trainer and never stored for the whole data set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dbllm_compile.errors import ConfigError

__all__ = ["LossSpec", "dad_weights", "distill_loss", "LOSSES"]

LOSSES = ("dad", "kl", "ce")


@dataclass(frozen=True)
class LossSpec:
    """Which distillation loss and its hyperparameters.

    Attributes:
        kind: ``"dad"`` (DAD-ED, the default), ``"kl"`` (forward KL(teacher || student)) or
            ``"ce"`` (cross-entropy of the student against the teacher's argmax token).
        gamma: DAD exponent on the ambiguity ``a_t``.
        lam: DAD mixing weight between plain KL (0) and fully re-weighted KL (1).
        temperature: softmax temperature for both distributions (KL and DAD).
    """

    kind: str = "dad"
    gamma: float = 1.0
    lam: float = 0.5
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in LOSSES:
            raise ConfigError(f"LossSpec.kind must be one of {LOSSES}, got {self.kind!r}")
        if not (self.gamma >= 0 and math.isfinite(self.gamma)):
            raise ConfigError(f"LossSpec.gamma must be a finite number >= 0, got {self.gamma!r}")
        if not 0.0 <= self.lam <= 1.0:
            raise ConfigError(f"LossSpec.lam must be in [0, 1], got {self.lam!r}")
        if not self.temperature > 0:
            raise ConfigError(f"LossSpec.temperature must be > 0, got {self.temperature!r}")


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    return -(logp.exp() * logp).sum(-1)


def dad_weights(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    *,
    gamma: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token DAD-ED weights ``w_t`` (mean 1 over unmasked tokens), shape ``logits.shape[:-1]``.

    Example:
        >>> t = torch.tensor([[0.0, 0.0, 0.0, 0.0], [10.0, 0.0, 0.0, 0.0]])  # ambiguous, confident
        >>> w = dad_weights(t, t)
        >>> bool(w[0] > w[1]), round(float(w.mean()), 6)
        (True, 1.0)
    """
    with torch.no_grad():
        v = teacher_logits.shape[-1]
        ht = _entropy(F.log_softmax(teacher_logits.float(), -1)) / math.log(v)
        hs = _entropy(F.log_softmax(student_logits.detach().float(), -1)) / math.log(v)
        a = (ht + (hs - ht).abs()).clamp_min(0) ** gamma
        if mask is None:
            # The token count as a number, not the sum of a tensor of ones: Triton 3.6 crashed on
            # Inductor's fused kernel of that sum (PassManager failure, results.md 3.0h).
            m = torch.ones_like(a)
            mean = a.sum() / max(a.numel(), 1)
        else:
            m = mask.to(a.dtype)
            a = a * m
            mean = a.sum() / m.sum().clamp_min(1)
        return torch.where(mean > 0, a / mean.clamp_min(1e-12), m)


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    spec: LossSpec = LossSpec(),
    *,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean per-token distillation loss of ``student_logits`` against ``teacher_logits``.

    Both are ``[..., V]``; ``mask`` (``[...]``, 1 = real token) excludes padding. Returns a
    float32 scalar with gradient to the student.

    Example:
        >>> t = torch.randn(2, 5, 11)
        >>> float(distill_loss(t, t, LossSpec("kl"))) < 1e-6
        True
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ; both models must see the same tokens"
        )
    v = student_logits.shape[-1]
    s = student_logits.reshape(-1, v).float() / spec.temperature
    t = teacher_logits.reshape(-1, v).float().detach() / spec.temperature
    if mask is None:  # no tensor of ones to sum: see dad_weights
        m, denom = None, max(s.shape[0], 1)
    else:
        m = mask.reshape(-1).to(s.device, torch.float32)
        denom = m.sum().clamp_min(1)

    def mean(per_token: torch.Tensor) -> torch.Tensor:
        return (per_token if m is None else per_token * m).sum() / denom

    if spec.kind == "ce":
        return mean(F.cross_entropy(s, t.argmax(-1), reduction="none"))
    logq = F.log_softmax(s, -1)
    logp = F.log_softmax(t, -1)
    per_token = (logp.exp() * (logp - logq)).sum(-1)  # KL(p || q) per token
    if spec.kind == "kl":
        return mean(per_token)
    w = dad_weights(t, s, gamma=spec.gamma, mask=m)
    return mean(((1 - spec.lam) + spec.lam * w) * per_token)
