"""Image encoders of the edge SAM family, written for casam: TinyViT (MobileSAM) and
EfficientViT-L (EfficientViT-SAM). Each keeps the official checkpoints' state-dict keys, so
``mobile_sam.pt`` and ``efficientvit_sam_l*.pt`` load unchanged, and each ends in SAM's
256×64×64 image embedding, which the alignment layer, router and decoder take as they are.
"""

from models.encoders.efficientvit import EfficientViTConfig, EfficientViTSamEncoder
from models.encoders.sam_vit import ViTConfig
from models.encoders.tiny_vit import TinyViT, TinyViTConfig

__all__ = ["EfficientViTConfig", "EfficientViTSamEncoder", "TinyViT", "TinyViTConfig", "ViTConfig"]
