"""Hyper-parameters of InterestSAGE and its training; defaults are the reported settings."""
from dataclasses import asdict, dataclass, fields


@dataclass
class ModelConfig:
    """Model shape and training settings (see docs/evaluation.md for the measured run)."""

    dim: int = 1024          # width of the degree-normalised block (the ideal low-pass): the largest basis
    sharp_dim: int = 256     # components of the raw block (the sharpening term)
    rank: int | None = None  # singular vectors the low-pass block uses (None: dim); the rest are zero
    degree: int = 3          # polynomial degree of each block's response h(sigma^2)
    alpha: float = 0.3       # initial weight of the low-pass block (GF-CF's value)
    sharp_alpha: float = 0.0  # initial weight of the raw block
    svd_iters: int = 4
    step: float = 0.1        # first move of a coefficient in the coordinate search
    min_step: float = 0.02
    epochs: int = 8
    batch_size: int = 1024
    patience: int = 2
    sample_users: int = 3000  # target users scored per measure, for fitting and for early stopping each
    holdout: float = 0.2     # share of each user's items held out for validation (the latest, where times are known)
    check_share: float = 0.5  # share of target users kept aside for early stopping
    # Wall-clock cap on training in minutes (None = none): stops after the epoch that passes it.
    max_minutes: float | None = 20.0
    seed: int = 0
    # The linear filter lin (spectral.LinearFilter): the weights it reads in the graph ("raw" as stored,
    # "log1p" or "binary"), in the scored user's row (None: the same) and, if > 0, how many nearest items
    # of each item its item-item matrix keeps. The defaults are GF-CF's filter on the stored weights (the
    # Gowalla settings); chosen per data set on validation.
    lin_weights: str = "raw"
    lin_user_weights: str | None = None
    lin_topk: int = 0
    # Past `table_edges` edges (0: never) `fit` sets lin_topk so that the filter is served from an item
    # table whose rows keep each item's `table_k` nearest items, fewer if the table would pass
    # `table_mb` MiB (spectral.table_topk): a request then reads that many entries per item of the
    # shopper, whatever the size of the graph.
    table_edges: int = 500_000
    table_k: int = 1000
    table_mb: int = 512
    lin_beta: float = 0.5    # exponent of the target item's degree in the filter (GF-CF: 1/2; less favours popular items)
    lin_weight: float = 1.0  # the filter's weight in the score (0: no filter)
    # EASE (graph_models.ease) as a term of the score: its L2 weight (0: none) and its weight in the score.
    ease_lambda: float = 0.0
    ease_weight: float = 0.0
    # Weight of the items' content cosines in EASE's Gram (ease.content_gram; 0: EASE on the edges alone,
    # as for a shop without item text).
    ease_content: float = 0.0
    # The settings search (graph_models.search): seeded trials on the validation split; 0 = keep these settings.
    search_trials: int = 60
    search_users: int = 2000  # validation users each trial is measured on (a seeded sample)
    # Item biases (graph_models.bias): with a temperature > 0, a shopper's scores are divided by their
    # largest and each item adds a learned bias, fitted by `bias_steps` gradient steps of size `bias_lr`
    # on a softmax over the unseen items at that temperature (L2 `bias_l2`); 0 = no biases (Gowalla).
    bias_temperature: float = 0.0
    bias_steps: int = 200
    bias_lr: float = 1.0
    bias_l2: float = 1e-3
    bias_finetune_steps: int = 20  # steps of a streaming update (graph_models.streaming.fine_tune)
    bias_finetune_l2: float = 1e-3
    # A live prior next to the learned biases: `trend_weight` x the items' trend (new adopters decayed
    # with a half-life of `trend_halflife` days, relative to the most trending item; bias.trend),
    # read from the live graph as the filter is, so that the refresh, not training, keeps it current.
    trend_halflife: float = 0.0
    trend_weight: float = 0.0
    k: int = 20

    @property
    def reads_trend(self) -> bool:
        """Whether the ranking adds the items' live trend (it needs edges' first times)."""
        return bool(self.trend_weight and self.trend_halflife > 0)

    def to_dict(self):
        """Plain JSON-able dict of the config."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        """Config from a dict, ignoring unknown keys so old checkpoints still load."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
