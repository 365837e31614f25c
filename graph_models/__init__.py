"""GraphSAGE interest-graph model: arrays and DGL graphs in, tensors out.

Knows nothing of Flask or Neo4j; the service exports edges and calls into here.
"""
from .config import ModelConfig
from .graph import build_graph
from .model import InterestSAGE

__all__ = ["ModelConfig", "InterestSAGE", "build_graph"]
