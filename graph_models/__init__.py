"""GraphSAGE interest-graph model: arrays and DGL graphs in, tensors out.

Knows nothing of Flask or Neo4j; the service exports edges and calls into here.
"""
from .config import ModelConfig
from .features import hash_bucket
from .graph import agg_weight, build_graph
from .model import InterestSAGE

__all__ = ["ModelConfig", "InterestSAGE", "agg_weight", "build_graph", "hash_bucket"]
