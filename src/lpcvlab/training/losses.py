"""The distillation loss both tracks train with: one temperature KL between a teacher's and a
student's logits (Track 2's class logits, Track 1's in-batch similarities in both directions)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def temperature_kl(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Mean over rows of ``KL(softmax(teacher / T) || softmax(student / T))``, in float32."""
    t = float(temperature)
    return F.kl_div(
        F.log_softmax(student.float() / t, dim=-1),
        F.log_softmax(teacher.float() / t, dim=-1),
        log_target=True,
        reduction="batchmean",
    )


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch
    (Hinton et al.; the ``T^2`` keeps the gradient's scale independent of ``T``)."""
    t = float(temperature)
    return temperature_kl(student, teacher, t) * t * t
