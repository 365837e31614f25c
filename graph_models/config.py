"""Hyper-parameters of InterestSAGE and its training; defaults are the reported settings."""
from dataclasses import asdict, dataclass, field, fields


@dataclass
class ModelConfig:
    """Model shape and training settings (see docs/evaluation.md for the measured run)."""

    dim: int = 64
    layers: int = 2
    category_buckets: int = 1024
    token_buckets: int = 4096
    use_features: bool = True
    dropout: float = 0.0
    lr: float = 5e-3
    weight_decay: float = 0.0
    epochs: int = 30
    batch_size: int = 2048
    fanouts: list = field(default_factory=lambda: [10, 20])
    negatives: int = 1024
    temperature: float = 0.1
    patience: int = 2
    # Wall-clock cap on training in minutes (None = none): training stops at the
    # first batch past it, then validates. Runs it stops depend on machine speed.
    max_minutes: float = 22.0
    seed: int = 0
    k: int = 20

    def to_dict(self):
        """Plain JSON-able dict of the config."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        """Config from a dict, ignoring unknown keys so old checkpoints still load."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
