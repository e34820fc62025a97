"""The alignment-layer loss of METHOD.md: focal + soft Dice + IoU-head MSE in the model frame.

All three terms are taken on logits upsampled to the model frame (1024 for SAM's ViTs and
MobileSAM, 512 for EfficientViT-SAM), where the target masks live, so a thin structure is
not lost to the 256×256 low-resolution grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FOCAL_GAMMA = 2.0
FOCAL_ALPHA = 0.25
DICE_SMOOTH = 1.0


def upsample_logits(low_res: torch.Tensor, size: int) -> torch.Tensor:
    """K×1×h×w → K×size×size (bilinear, align_corners=False, as SAM's postprocessing)."""
    return F.interpolate(low_res, size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = FOCAL_GAMMA, alpha: float = FOCAL_ALPHA) -> torch.Tensor:
    """Sigmoid focal loss, mean over every pixel of every mask."""
    prob = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    weight = alpha * target + (1 - alpha) * (1 - target)
    return (weight * (1 - p_t) ** gamma * ce).mean()


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = DICE_SMOOTH) -> torch.Tensor:
    """1 − soft Dice per mask, averaged over masks."""
    prob = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    dice = (2 * (prob * t).sum(1) + smooth) / (prob.sum(1) + t.sum(1) + smooth)
    return (1 - dice).mean()


def soft_iou(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Per-mask IoU of the sigmoid prediction with the target (K,)."""
    prob = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    inter = (prob * t).sum(1)
    return inter / (prob.sum(1) + t.sum(1) - inter + eps)


def alignment_loss(low_res: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """K×1×256×256 logits, K×1 predicted IoU, K×S×S {0,1} targets in the S×S model frame → (loss, parts).

    The IoU head's target is the soft IoU of the prediction itself, detached: the head
    should learn to report mask quality, not pull the mask towards its own estimate.
    """
    logits = upsample_logits(low_res, target.shape[-1])
    focal = focal_loss(logits, target)
    dice = dice_loss(logits, target)
    iou_mse = F.mse_loss(iou_pred[:, 0], soft_iou(logits, target).detach())
    total = focal + dice + iou_mse
    return total, {"focal": float(focal.detach()), "dice": float(dice.detach()), "iou_mse": float(iou_mse.detach())}
