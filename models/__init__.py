"""PyTorch modules of CA-SAM: frozen SAM loading, alignment layers, VAEs, router, model."""

from models.alignment import AlignmentLayer, CAResBlock, LayerNorm2d, count_parameters
from models.casam import CASAM, CASAMOutput, routes_to_names
from models.pooling import attention_pool
from models.prompt_decoder import PromptDecoder
from models.router import IDENTITY_INDEX, Router, StackedVAEScorer, choose_routes
from models.sam_loader import FrozenSam, known_models, load_frozen_sam, read_state_dict
from models.vae import TaskVAE

__all__ = [
    "AlignmentLayer", "CAResBlock", "LayerNorm2d", "count_parameters", "CASAM", "CASAMOutput",
    "routes_to_names", "attention_pool", "PromptDecoder", "IDENTITY_INDEX", "Router", "StackedVAEScorer",
    "choose_routes", "FrozenSam", "known_models", "load_frozen_sam", "read_state_dict",
    "TaskVAE",
]
