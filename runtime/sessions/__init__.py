"""Interactive sessions: one image or volume held between prompts, for casam-label and casam-infer --clicks.

SAM was built for interaction: the heavy encoder once per image, then the light decoder per
prompt. A session keeps each image's (or volume slice's) *aligned* embedding in a shared,
byte-budgeted cache, so a box or a click after the first one runs the decoder alone.
"""

from runtime.sessions.embedding_cache import EmbeddingCache, SliceEmbedding
from runtime.sessions.history import Step
from runtime.sessions.session import Interaction, RouteDecision, Session, SessionOptions
from runtime.sessions.source import SessionSource
from runtime.sessions.store import SessionStore, StoreOptions

__all__ = ["EmbeddingCache", "Interaction", "RouteDecision", "Session", "SessionOptions", "SessionSource",
           "SessionStore", "SliceEmbedding", "Step", "StoreOptions"]
