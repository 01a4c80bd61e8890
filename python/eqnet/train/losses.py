"""Losses of the supernet recipes.

- `wdr_loss`: EQ-Net's weight distribution regularization (kurtosis and skewness of each
  elastic layer's float weight tensor pulled toward those of a uniform distribution).
- `kl_distill`, `gpg_losses`: EQ-Net's group progressive guidance (a higher subnet's
  detached prediction teaches the next lower one, mixed half and half with the CE).
- `soft_cross_entropy`: CE against a probability target (the online adaptive label,
  MultiQuant eq. 4, is a soft target).
- `cosine_distill`: vertical layering's self-distillation (eq. 11) with cosine similarity.
- `min_norm_weights`: the MGD combination weights (vertical layering eq. 10), the min-norm
  point of the convex hull of per-objective gradients, by Frank-Wolfe.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

# Kurtosis of a uniform distribution is 9/5: the WDR target (EQ-Net eq. 6).
UNIFORM_KURTOSIS = 1.8


def standardized_moments(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(skewness, kurtosis) of all entries of `w`: E[((w-mu)/sigma)^3], E[((w-mu)/sigma)^4]
    with the population standard deviation."""
    w = w.flatten()
    if w.numel() < 2:
        raise ValueError(f"weight tensor with {w.numel()} element(s): moments need at least 2")
    mu = w.mean()
    # eps keeps a constant tensor (sigma = 0) finite; it is far below any trained weight's std.
    sigma = (w - mu).pow(2).mean().add(1e-12).sqrt()
    z = (w - mu) / sigma
    return z.pow(3).mean(), z.pow(4).mean()


def wdr_loss(
    weights: Sequence[torch.Tensor],
    lambda_kurt: float = 0.015,
    lambda_skew: float = 1.0,
    kurt_target: float = UNIFORM_KURTOSIS,
) -> torch.Tensor:
    """lambda_kurt * mean_l (Kurt_l - 1.8)^2 + lambda_skew * mean_l Skew_l^2, one term per
    whole weight tensor (EQ-Net section 3.4)."""
    if not weights:
        raise ValueError("weights: wdr_loss needs at least one weight tensor")
    skews, kurts = zip(
        *(standardized_moments(w if w.dtype == torch.float64 else w.float()) for w in weights)
    )
    kurt = torch.stack(kurts)
    skew = torch.stack(skews)
    return lambda_kurt * (kurt - kurt_target).pow(2).mean() + lambda_skew * skew.pow(2).mean()


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-sum_n target[n] log softmax(logits)[n], mean over the batch. `target` may be class
    indices (hard CE) or a [B, N] probability matrix."""
    if target.dtype in (torch.int64, torch.int32, torch.uint8, torch.int16, torch.int8):
        return F.cross_entropy(logits.float(), target.long())
    return -(target * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


def kl_distill(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """KL(p_teacher || p_student), mean over the batch; the teacher is detached."""
    t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    s = F.log_softmax(student_logits.float() / temperature, dim=1)
    kl = (t.exp() * (t - s)).sum(dim=1).mean()
    # T^2 keeps the gradient scale independent of T (Hinton et al.); 1 at the default T = 1.
    return kl * temperature**2


def gpg_loss(
    teacher_logits: torch.Tensor | None,
    student_logits: torch.Tensor,
    ce: Callable[[torch.Tensor], torch.Tensor],
    kd_weight: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """One subnet's group progressive guidance loss: `ce(student)` for the top subnet
    (teacher None), else `kd_weight * KL(teacher || student) + (1 - kd_weight) * ce(student)`
    with the teacher detached (EQ-Net eq. 7-8, lambda = 0.5, T = 1)."""
    if teacher_logits is None:
        return ce(student_logits)
    kd = kl_distill(teacher_logits, student_logits, temperature)
    return kd_weight * kd + (1.0 - kd_weight) * ce(student_logits)


def gpg_losses(
    logits: Sequence[torch.Tensor],
    ce: Callable[[torch.Tensor], torch.Tensor],
    kd_weight: float = 0.5,
    temperature: float = 1.0,
) -> list[torch.Tensor]:
    """`gpg_loss` of every subnet; `logits` ordered from the highest subnet down to the lowest,
    each taught by the one before it."""
    if not logits:
        raise ValueError("logits: gpg_losses needs at least one subnet output")
    teachers = [None, *logits[:-1]]
    return [gpg_loss(t, s, ce, kd_weight, temperature) for t, s in zip(teachers, logits)]


def cosine_distill(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """1 - cos(softmax(teacher), softmax(student)), mean over the batch; teacher detached
    (vertical layering eq. 11: robust when the teacher is ambiguous)."""
    t = F.softmax(teacher_logits.detach().float(), dim=1)
    s = F.softmax(student_logits.float(), dim=1)
    return (1.0 - F.cosine_similarity(t, s, dim=1, eps=1e-12)).mean()


def min_norm_weights(
    grads: Sequence[torch.Tensor] | torch.Tensor, max_iter: int = 500, tol: float = 1e-12
) -> torch.Tensor:
    """argmin_alpha || sum_i alpha_i g_i ||^2 over the simplex (alpha >= 0, sum alpha = 1):
    the MGD weights of vertical layering eq. 10, by Frank-Wolfe (the solver of Sener & Koltun
    2018 that the paper cites) with away steps and exact line search on the Gram matrix.
    Plain Frank-Wolfe converges sublinearly when the optimum lies on a face of the simplex
    (a width whose gradient gets weight 0); away steps remove weight from such vertices and
    converge linearly on a polytope (Lacoste-Julien & Jaggi 2015). `grads` is a list of
    gradients (any shapes, flattened) or an [n, d] matrix. Returns float64 weights."""
    if isinstance(grads, torch.Tensor):
        g = grads.detach().to(torch.float64).reshape(grads.shape[0], -1)
    else:
        if not grads:
            raise ValueError("grads: min_norm_weights needs at least one gradient")
        g = torch.stack([x.detach().to(torch.float64).flatten() for x in grads])
    n = g.shape[0]
    gram = g @ g.T
    alpha = torch.full((n,), 1.0 / n, dtype=torch.float64)
    if n == 1:
        return alpha
    scale = float(gram.diagonal().max())
    if scale == 0.0:
        return alpha  # every gradient is zero: any weights are optimal
    eye = torch.eye(n, dtype=torch.float64)
    for _ in range(max_iter):
        grad = gram @ alpha  # half the gradient of alpha^T M alpha
        s = int(torch.argmin(grad))
        fw_dir = eye[s] - alpha
        fw_gap = -float(grad @ fw_dir)
        if fw_gap <= tol * scale:
            break
        active = alpha > 0
        v = int(torch.where(active, grad, torch.full_like(grad, -torch.inf)).argmax())
        away_dir = alpha - eye[v]
        if fw_gap >= -float(grad @ away_dir) or alpha[v] >= 1.0:
            direction, gamma_max = fw_dir, 1.0
        else:
            direction, gamma_max = away_dir, float(alpha[v] / (1.0 - alpha[v]))
        curv = float(direction @ gram @ direction)
        slope = float(grad @ direction)
        gamma = gamma_max if curv <= 0.0 else min(max(-slope / curv, 0.0), gamma_max)
        if gamma <= 0.0:
            break
        alpha = (alpha + gamma * direction).clamp_min(0.0)
        alpha = alpha / alpha.sum()
    return alpha
