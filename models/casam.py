"""The CA-SAM model: frozen encoder → router → task alignment or identity → frozen decoder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from models.alignment import AlignmentLayer
from models.errors import ShapeError
from models.prompt_decoder import PromptDecoder
from models.router import IDENTITY_INDEX, Router, choose_routes
from casam_core.names import IDENTITY
from runtime.prompts import Prompts

TaskChoice = Union[None, int, str]
PerImage = Union[torch.Tensor, Sequence[Optional[torch.Tensor]], None]


@dataclass
class CASAMOutput:
    """Per image: low-res mask logits (K×1×256×256) and IoU (K×1); routes and scores for the batch.

    ``routes[b]`` is a task index or ``IDENTITY_INDEX`` (-1) for plain SAM.
    """

    masks: list[torch.Tensor]
    iou: list[torch.Tensor]
    routes: torch.Tensor
    scores: torch.Tensor
    pooled: torch.Tensor


class CASAM(nn.Module):
    def __init__(
        self,
        sam: nn.Module,
        task_names: Sequence[str] = (),
        alignment_layers: Sequence[AlignmentLayer] = (),
        router: Optional[Router] = None,
        thresholds: Optional[Sequence[float]] = None,
    ) -> None:
        super().__init__()
        n = len(task_names)
        if len(alignment_layers) != n or (router is not None and router.num_tasks != n):
            raise ShapeError(
                f"{n} task names, {len(alignment_layers)} alignment layers and "
                f"{router.num_tasks if router else 0} router tasks must match"
            )
        self.image_encoder = sam.image_encoder
        self.decoder = PromptDecoder(sam)
        self.task_names = list(task_names)
        self.alignment = nn.ModuleList(alignment_layers)
        self.router = router if router is not None else Router([])
        self.register_buffer(
            "thresholds", torch.tensor(list(thresholds) if thresholds is not None else [float("inf")] * n, dtype=torch.float32)
        )

    def task_index(self, task: TaskChoice) -> Optional[int]:
        """None → route; "identity"/-1 → IDENTITY_INDEX; a name or index → that task."""
        if task is None:
            return None
        if isinstance(task, str):
            if task == IDENTITY:
                return IDENTITY_INDEX
            if task not in self.task_names:
                raise ValueError(f"unknown task {task!r}; known: {', '.join(self.task_names) or 'none'}, identity")
            return self.task_names.index(task)
        if task != IDENTITY_INDEX and not 0 <= task < len(self.task_names):
            raise ValueError(f"task index {task} out of range for {len(self.task_names)} tasks")
        return int(task)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        h, w = self.frame_hw
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, h, w):
            raise ShapeError(f"CASAM expects preprocessed B×3×{h}×{w} images (its SAM's input), "
                             f"got shape {tuple(images.shape)}")
        return self.image_encoder(images)

    def align(self, embedding: torch.Tensor, route: int) -> torch.Tensor:
        return embedding if route == IDENTITY_INDEX else self.alignment[route](embedding)

    def route(self, embeddings: torch.Tensor, task: TaskChoice = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pooled, scores = self.router(embeddings)
        forced = self.task_index(task)
        if forced is None:
            routes = choose_routes(scores, self.thresholds)
        else:
            routes = torch.full((embeddings.shape[0],), forced, dtype=torch.long, device=embeddings.device)
        return pooled, scores, routes

    @property
    def frame_hw(self) -> tuple[int, int]:
        """The model frame's size: the SAM variant's input (1024×1024 for the ViTs and MobileSAM,
        512×512 for EfficientViT-SAM L0/L1), where prompts are given and masks are decoded."""
        h, w = self.decoder.prompt_encoder.input_image_size
        return int(h), int(w)

    def decode(self, embedding: torch.Tensor, prompts: Prompts,
               scale_xy: tuple[float, float] = (1.0, 1.0)) -> tuple[torch.Tensor, torch.Tensor]:
        """One (aligned or raw) 1×256×64×64 embedding and K prompts → (K×1×256×256 logits, K×1 IoU).

        ``prompts`` are the runtime's (``Prompts.for_image`` of the original image) and
        ``scale_xy`` moves them into the model frame (``Frame.scale_xy``), the very
        arithmetic ``runtime.pipeline.Pipeline`` runs; (1, 1) for prompts made in the frame.
        ``prompts.mask_input`` (a previous prediction's K×1×256×256 logits) corrects it, as
        ``SamPredictor.predict(mask_input=...)`` does.
        """
        coords, labels = prompts.encode(scale_xy)
        dev = embedding.device
        mask = None if prompts.mask_input is None else torch.from_numpy(prompts.mask_input).to(dev)
        return self.decoder(embedding, torch.from_numpy(coords).to(dev), torch.from_numpy(labels).to(dev), mask)

    def forward(
        self,
        images: torch.Tensor,
        boxes: PerImage = None,
        points: PerImage = None,
        point_labels: PerImage = None,
        task: TaskChoice = None,
    ) -> CASAMOutput:
        """Preprocessed B×3×S×S images (S = ``frame_hw``) and, per image, K boxes (K×4) and/or
        points (K×P×2) in the model frame (checked as ``Prompts.for_image`` of that frame)."""
        embeddings = self.encode(images)
        return self.forward_embeddings(embeddings, boxes, points, point_labels, task)

    def forward_embeddings(
        self,
        embeddings: torch.Tensor,
        boxes: PerImage = None,
        points: PerImage = None,
        point_labels: PerImage = None,
        task: TaskChoice = None,
    ) -> CASAMOutput:
        """The same as ``forward`` from precomputed raw encoder embeddings (B×256×64×64)."""
        pooled, scores, routes = self.route(embeddings, task)
        pick = lambda seq, i: None if seq is None or seq[i] is None else _numpy(seq[i])  # noqa: E731
        masks, ious = [], []
        for b in range(embeddings.shape[0]):
            emb = self.align(embeddings[b : b + 1], int(routes[b]))
            prompts = Prompts.for_image(self.frame_hw, pick(boxes, b), pick(points, b), pick(point_labels, b))
            m, q = self.decode(emb, prompts)
            masks.append(m)
            ious.append(q)
        return CASAMOutput(masks, ious, routes, scores, pooled)


def _numpy(value: Union[torch.Tensor, np.ndarray]) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def routes_to_names(routes: torch.Tensor | np.ndarray, task_names: Sequence[str]) -> list[str]:
    return [IDENTITY if int(r) == IDENTITY_INDEX else task_names[int(r)] for r in routes]
