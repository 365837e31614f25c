"""All configuration, read from the environment (and the git-ignored `.env`) in one place."""
from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from dotenv import dotenv_values

ROOT = Path(__file__).resolve().parents[1]
ENV_FILE = ROOT / ".env"
MIGRATIONS_DIR = ROOT / "migrations"
NEO4J_VERSION = "5.26.30"
NEO4J_BROWSER_VERSION = "5.24.0"
KAFKA_VERSION = "4.4.0"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _ensure_secret(name: str) -> str:
    """Return `name` from `.env`, generating and saving one (mode 0600) on first use."""
    stored = dotenv_values(ENV_FILE).get(name) if ENV_FILE.exists() else None
    if stored:
        return stored
    value = secrets.token_urlsafe(18)
    with open(os.open(ENV_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "a") as fh:
        fh.write(f"{name}={value}\n")
    os.chmod(ENV_FILE, 0o600)
    return value


def _ensure_password() -> str:
    """Return NEO4J_PASSWORD from `.env`, generating and saving one (mode 0600) on first use."""
    return _ensure_secret("NEO4J_PASSWORD")


LIN_WEIGHTS = ("raw", "log1p", "binary")  # graph_models.spectral.LIN_WEIGHTS


def _env(env: dict, name: str, default=None, cast=str):
    value = env.get(name)
    return default if value in (None, "") else cast(value)


CONTENT_MAPS = ("on", "knn", "off")
CONTENT_SCORES = ("mix", "rows")


def _choice(env: dict, name: str, default: str, allowed: tuple[str, ...]) -> str:
    """A setting limited to `allowed` (case-insensitive), else a ValueError naming the variable."""
    value = _env(env, name, default)
    match = next((a for a in allowed if a.lower() == value.lower()), None)
    if match is None:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
    return match


class ConfigError(ValueError):
    """A setting that cannot be used as given."""


def _switch(text: str) -> bool:
    """`on`/`off` (also true/false, 1/0) -> bool."""
    value = text.strip().lower()
    if value not in ("on", "off", "true", "false", "1", "0"):
        raise ValueError(f"expected on or off, got {text!r}")
    return value in ("on", "true", "1")


def _pairs(text: str) -> dict[str, float]:
    """Parse `view:1,cart:3` into a dict."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition(":")
        out[key.strip()] = float(value)
    return out


@dataclass(frozen=True)
class Config:
    """Settings shared by the API, the worker and the CLI."""

    neo4j_uri: str = "bolt://127.0.0.1:7687"
    neo4j_user: str = "neo4j"
    neo4j_password: str = ""
    neo4j_database: str = "neo4j"
    neo4j_http_port: int = 7474
    admin_token: str | None = None
    # reliability and security (bounds and credentials; see docs/reliability.md)
    auth: bool = True  # IG_AUTH=off opens writes and reads: local runs only (loopback IG_HOST)
    service_token: str | None = None  # ingest and item updates
    privacy_token: str | None = None  # erasure (the admin token works too)
    read_token: str | None = None  # reads and /metrics (the admin token works too)
    open_reads: bool = False  # IG_OPEN_READS=on: reads and /metrics need no token
    # The keyed hash of an erased user's id (app/ids.py); every process of one graph needs the same.
    erasure_secret: str = ""
    rate_limit: str | None = None  # flask-limiter syntax, e.g. "50/second;2000/minute"; unset: off
    rate_limit_storage: str = "memory://"
    neo4j_timeout: float = 2.0  # longest a request waits to reach Neo4j before a 503
    tx_timeout: float = 30.0  # longest any Neo4j transaction may run
    ingest_wait: float = 10.0  # longest an ingest request waits for its group commit (then 503)
    ingest_queue: int = 50_000  # events waiting for a group commit in a process; past it, 503 at once
    retry_after: int = 1  # seconds a client is told to wait after a 503
    max_body_bytes: int = 8 * 1024 * 1024
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 2
    threads: int = 1  # request threads per worker process (docs/benchmarks.md: one keeps the read tail short)
    keepalive_requests: int = 100  # answers a client connection carries on average before a reconnect (0: no limit)
    home: Path = Path.home() / ".local" / "share" / "interest-graph"
    cache: Path = Path.home() / ".cache" / "interest-graph"
    neo4j_heap: str = "2g"
    neo4j_pagecache: str = "2g"
    neo4j_telemetry: bool = False  # Browser's product-usage data and outgoing connections: opt-in
    # model: `train` chooses the settings on the shop's validation split (graph_models.search);
    # embed_dim and sharp_dim bound the basis sizes it may choose (and fix the stored vectors' length)
    embed_dim: int = 256
    sharp_dim: int = 64
    train_minutes: float = 5.0  # the settings search's time budget (it stops after the trial that passes it)
    search_trials: int = 60  # trials of the search (0: no search, the settings below or the model's defaults)
    # Past table_edges edges (0: never) the graph filter is served from an item table whose rows keep each
    # item's table_k nearest items, fewer if it would pass table_mb MiB: a request then costs the
    # shopper's items x the row length, whatever the size of the graph (graph_models.spectral.table_topk).
    table_edges: int = 500_000
    table_k: int = 1000
    table_mb: int = 512
    # Settings the search would choose, fixed instead when set: the graph filter's weights (raw, log1p,
    # binary), those of the scored shopper's row, the low-pass block's weight and the item biases'
    # temperature (0: none). Unset: chosen on validation.
    lin_weights: str | None = None
    lin_user_weights: str | None = None
    model_alpha: float | None = None
    item_bias: float | None = None
    # With biases: the L2 weight of their fit at training, and a live trend prior next to them (the
    # half-life of new adopters in days, 0: none, and its weight; graph_models.bias.trend), which the
    # serving copy reads from the live graph. Online Retail's stream evaluation chose 0.1, 3 and 0.2.
    bias_l2: float = 1e-3
    item_trend: float = 0.0
    trend_weight: float = 0.0
    # What `train` saves with the version to give items without a trained row rows from their content
    # (graph_models.coldstart): "on" the learned content map (a minute or two; it ranked the validation
    # items better), "knn" its untrained attention (content-kNN, seconds), "off" nothing (the zero row).
    content_map: str = "on"
    # How such a version ranks those items: "mix", the attention mix of the shopper's full scores of the
    # known items each attends to (chosen on validation items, docs/evaluation.md); "rows", p_u . q_hat.
    content_score: str = "mix"
    model_dir: Path | None = None
    # ingest
    batch_limit: int = 10_000
    type_weights: dict = field(default_factory=lambda: {
        "view": 1.0, "click": 1.0, "cart": 3.0, "purchase": 5.0, "return": -5.0})
    half_life_days: float = 30.0
    decay_anchor: str = "2010-01-01T00:00:00Z"
    max_quantity: float = 10_000.0
    max_price: float = 100_000.0
    max_future_seconds: float = 86_400.0
    bot_events_per_minute: float = 600.0
    id_hmac_key: str | None = None
    # Event ids are kept this long for deduplication: a duplicate older than the window is accepted again.
    dedup_retention_days: float = 7.0
    purge_interval: float = 60.0  # seconds between the worker's purges of expired event ids
    purge_batch: int = 10_000     # event ids deleted per transaction (at most 100 transactions a purge)
    # Kafka in front of ingest (docs/scaling.md): IG_INGEST=kafka answers POST /v1/events once the
    # batch is in the topic, and `interest-graph consume` folds the topic into Neo4j.
    ingest: str = "direct"
    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_controller_port: int = 9093  # the local broker's KRaft controller (`interest-graph kafka start`)
    kafka_topic: str = "ig-events"
    kafka_partitions: int = 4  # the most consumers that can share the topic
    kafka_group: str = "interest-graph"
    kafka_heap: str = "512m"
    kafka_wait: float = 10.0  # longest an ingest request waits for the broker's acknowledgement (then 503)
    consume_batch: int = 20_000  # messages a consumer folds into one Neo4j transaction at most
    # A consumer silent this long (killed, hung) loses its partitions to the others (Kafka's default: 45 s).
    kafka_session_timeout: float = 10.0
    # refresh
    refresh_interval: float = 1.0
    full_share: float = 0.5
    refresh_max_users: int = 1000  # changed users one incremental run takes (0: all); the rest wait for the next
    # While users wait, the worker's runs take as many users (a quarter of the cap at least) as the last
    # runs' pace fits in this many seconds: a shopper arriving during a backlog waits for about two (0: off).
    refresh_target_seconds: float = 0.5
    worker_nice: int = 10  # the worker's CPU priority below the API's and Neo4j's on a shared machine
    full_batch: int = 2000  # nodes per write transaction of a full recompute (edges: ten times as many)
    retrain_cron: str = "0 3 * * *"
    lease_seconds: float = 10.0
    # serving
    max_k: int = 500  # largest k of any ranked answer
    max_batch_users: int = 100  # users of one POST /v1/recommendations
    # Work per request (docs/reliability.md, "Bounds"): explain without the item-item table reads k x users
    # entries; a batch call reads at most `batch_max_work` entries (State.work: each user's two products
    # over the copy's edges, or their items' rows of an item table); churn risk scans every edge, so past
    # `churn_max_edges` it answers 413.
    explain_max_mb: float = 64
    batch_max_work: int = 100_000_000
    churn_max_k: int = 1000
    churn_max_edges: int = 100_000
    # An audience (app/serving/audience.py) scores at most this many candidate users in full; k beyond it: 400.
    audience_candidates: int = 2000
    # Stored churn scores (app/churn.py): the worker retrains and rescores every `churn_interval` seconds
    # (and after each retrain), labelling "no event in the next `churn_horizon_days`"; a candidate is
    # promoted unless its validation AUC is below the current model's by more than `churn_tolerance`.
    churn_interval: float = 3600.0
    churn_horizon_days: int = 90
    churn_tolerance: float = 0.005
    # Each API process keeps the current scoring run's top `churn_max_k` and serves slices of it; a request
    # at least `churn_check` seconds after the last check reads the run's stamp (one node) to see a new run.
    churn_check: float = 5.0
    # The API's copy of the graph (app/serving/graph.py): a request finding it older than `max_age`
    # seconds waits up to `sync_wait` for a sync; past `poll` seconds it starts one in the background.
    serving_sync_wait: float = 0.25
    serving_poll: float = 0.5
    serving_max_age: float = 1.0
    # a request waits this long for the copy's first load (at start), then gets 503 with Retry-After
    serving_start_wait: float = 1.5
    # explain's item-item table (dense, items^2 x 8 bytes per API process) while within this bound
    explain_table_mb: float = 256
    interest_history: int = 20  # refreshes whose drift each user keeps
    # logs
    log_level: str = "INFO"
    log_format: str = "text"
    # streaming learning between retrains (off unless a schedule is set)
    finetune_cron: str | None = None
    finetune_recent_days: float = 7.0
    finetune_check_days: float = 1.0
    finetune_replay: float = 1.0
    finetune_rounds: int = 2  # rounds of the response search (0: with item biases, only they move)

    @property
    def audience_max_k(self) -> int:
        """Largest k of an audience: IG_MAX_K, and no more than the candidates it scores."""
        return min(self.max_k, self.audience_candidates)

    @property
    def decay_anchor_ms(self) -> int:
        """The fixed decay anchor A as epoch milliseconds (edge weights are relative to it)."""
        from datetime import datetime
        return int(datetime.fromisoformat(self.decay_anchor.replace("Z", "+00:00")).timestamp() * 1000)

    @property
    def vector_dim(self) -> int:
        """Length of stored embeddings: both spectral blocks plus the inner-product coordinate."""
        return self.embed_dim + min(self.sharp_dim, self.embed_dim) + 1

    @property
    def models_path(self) -> Path:
        """Directory holding model checkpoints."""
        return self.model_dir or self.home / "models"


def load_config(**overrides) -> Config:
    """Build the Config from `.env` overlaid by the process environment, then `overrides`."""
    env = {**(dotenv_values(ENV_FILE) if ENV_FILE.exists() else {}), **os.environ}
    password = env.get("NEO4J_PASSWORD") or _ensure_password()
    values = dict(
        neo4j_uri=_env(env, "NEO4J_URI", Config.neo4j_uri),
        neo4j_user=_env(env, "NEO4J_USER", Config.neo4j_user),
        neo4j_password=password,
        neo4j_database=_env(env, "NEO4J_DATABASE", Config.neo4j_database),
        neo4j_http_port=_env(env, "NEO4J_HTTP_PORT", Config.neo4j_http_port, int),
        admin_token=_env(env, "IG_ADMIN_TOKEN"),
        auth=_env(env, "IG_AUTH", True, _switch),
        service_token=_env(env, "IG_SERVICE_TOKEN"),
        privacy_token=_env(env, "IG_PRIVACY_TOKEN"),
        read_token=_env(env, "IG_READ_TOKEN"),
        open_reads=_env(env, "IG_OPEN_READS", False, _switch),
        erasure_secret=env.get("IG_ERASURE_SECRET") or _ensure_secret("IG_ERASURE_SECRET"),
        rate_limit=_env(env, "IG_RATE_LIMIT"),
        rate_limit_storage=_env(env, "IG_RATE_LIMIT_STORAGE", Config.rate_limit_storage),
        neo4j_timeout=_env(env, "IG_NEO4J_TIMEOUT", Config.neo4j_timeout, float),
        tx_timeout=_env(env, "IG_TX_TIMEOUT", Config.tx_timeout, float),
        ingest_wait=_env(env, "IG_INGEST_WAIT", Config.ingest_wait, float),
        ingest_queue=_env(env, "IG_INGEST_QUEUE", Config.ingest_queue, int),
        retry_after=_env(env, "IG_RETRY_AFTER", Config.retry_after, int),
        max_body_bytes=_env(env, "IG_MAX_BODY_BYTES", Config.max_body_bytes, int),
        host=_env(env, "IG_HOST", Config.host),
        port=_env(env, "IG_PORT", Config.port, int),
        workers=_env(env, "IG_WORKERS", Config.workers, int),
        threads=_env(env, "IG_THREADS", Config.threads, int),
        keepalive_requests=_env(env, "IG_KEEPALIVE_REQUESTS", Config.keepalive_requests, int),
        home=_env(env, "IG_HOME", Config.home, Path),
        cache=_env(env, "IG_CACHE", Config.cache, Path),
        neo4j_heap=_env(env, "IG_NEO4J_HEAP", Config.neo4j_heap),
        neo4j_pagecache=_env(env, "IG_NEO4J_PAGECACHE", Config.neo4j_pagecache),
        neo4j_telemetry=_choice(env, "IG_NEO4J_TELEMETRY", "false", ("true", "false")) == "true",
        embed_dim=_env(env, "IG_EMBED_DIM", Config.embed_dim, int),
        sharp_dim=_env(env, "IG_SHARP_DIM", Config.sharp_dim, int),
        train_minutes=_env(env, "IG_TRAIN_MINUTES", Config.train_minutes, float),
        search_trials=_env(env, "IG_SEARCH_TRIALS", Config.search_trials, int),
        table_edges=_env(env, "IG_LIN_TABLE_EDGES", Config.table_edges, int),
        table_k=_env(env, "IG_LIN_TABLE_K", Config.table_k, int),
        table_mb=_env(env, "IG_LIN_TABLE_MB", Config.table_mb, int),
        lin_weights=_choice(env, "IG_LIN_WEIGHTS", "raw", LIN_WEIGHTS) if env.get("IG_LIN_WEIGHTS") else None,
        lin_user_weights=_choice(env, "IG_LIN_USER_WEIGHTS", "raw", LIN_WEIGHTS) if env.get("IG_LIN_USER_WEIGHTS") else None,
        model_alpha=_env(env, "IG_MODEL_ALPHA", None, float),
        item_bias=_env(env, "IG_ITEM_BIAS", None, float),
        bias_l2=_env(env, "IG_BIAS_L2", Config.bias_l2, float),
        item_trend=_env(env, "IG_ITEM_TREND", Config.item_trend, float),
        trend_weight=_env(env, "IG_TREND_WEIGHT", Config.trend_weight, float),
        content_map=_choice(env, "IG_CONTENT_MAP", Config.content_map, CONTENT_MAPS),
        content_score=_choice(env, "IG_CONTENT_SCORE", Config.content_score, CONTENT_SCORES),
        model_dir=_env(env, "IG_MODEL_DIR", None, Path),
        batch_limit=_env(env, "IG_BATCH_LIMIT", Config.batch_limit, int),
        half_life_days=_env(env, "IG_HALF_LIFE_DAYS", Config.half_life_days, float),
        decay_anchor=_env(env, "IG_DECAY_ANCHOR", Config.decay_anchor),
        max_quantity=_env(env, "IG_MAX_QUANTITY", Config.max_quantity, float),
        max_price=_env(env, "IG_MAX_PRICE", Config.max_price, float),
        max_future_seconds=_env(env, "IG_MAX_FUTURE_SECONDS", Config.max_future_seconds, float),
        bot_events_per_minute=_env(env, "IG_BOT_EVENTS_PER_MINUTE", Config.bot_events_per_minute, float),
        id_hmac_key=_env(env, "IG_ID_HMAC_KEY"),
        dedup_retention_days=_env(env, "IG_DEDUP_RETENTION_DAYS", Config.dedup_retention_days, float),
        purge_interval=_env(env, "IG_PURGE_INTERVAL", Config.purge_interval, float),
        purge_batch=_env(env, "IG_PURGE_BATCH", Config.purge_batch, int),
        ingest=_choice(env, "IG_INGEST", Config.ingest, ("direct", "kafka")),
        kafka_bootstrap=_env(env, "IG_KAFKA_BOOTSTRAP", Config.kafka_bootstrap),
        kafka_controller_port=_env(env, "IG_KAFKA_CONTROLLER_PORT", Config.kafka_controller_port, int),
        kafka_topic=_env(env, "IG_KAFKA_TOPIC", Config.kafka_topic),
        kafka_partitions=_env(env, "IG_KAFKA_PARTITIONS", Config.kafka_partitions, int),
        kafka_group=_env(env, "IG_KAFKA_GROUP", Config.kafka_group),
        kafka_heap=_env(env, "IG_KAFKA_HEAP", Config.kafka_heap),
        kafka_wait=_env(env, "IG_KAFKA_WAIT", Config.kafka_wait, float),
        consume_batch=_env(env, "IG_CONSUME_BATCH", Config.consume_batch, int),
        kafka_session_timeout=_env(env, "IG_KAFKA_SESSION_TIMEOUT", Config.kafka_session_timeout, float),
        refresh_interval=_env(env, "IG_REFRESH_INTERVAL", Config.refresh_interval, float),
        full_share=_env(env, "IG_FULL_SHARE", Config.full_share, float),
        refresh_max_users=_env(env, "IG_REFRESH_MAX_USERS", Config.refresh_max_users, int),
        refresh_target_seconds=_env(env, "IG_REFRESH_TARGET_SECONDS", Config.refresh_target_seconds, float),
        worker_nice=_env(env, "IG_WORKER_NICE", Config.worker_nice, int),
        full_batch=_env(env, "IG_FULL_BATCH", Config.full_batch, int),
        retrain_cron=_env(env, "IG_RETRAIN_CRON", Config.retrain_cron),
        lease_seconds=_env(env, "IG_LEASE_SECONDS", Config.lease_seconds, float),
        max_k=_env(env, "IG_MAX_K", Config.max_k, int),
        max_batch_users=_env(env, "IG_MAX_BATCH_USERS", Config.max_batch_users, int),
        explain_max_mb=_env(env, "IG_EXPLAIN_MAX_MB", Config.explain_max_mb, float),
        batch_max_work=_env(env, "IG_BATCH_MAX_WORK", Config.batch_max_work, int),
        churn_max_k=_env(env, "IG_CHURN_MAX_K", Config.churn_max_k, int),
        churn_max_edges=_env(env, "IG_CHURN_MAX_EDGES", Config.churn_max_edges, int),
        audience_candidates=_env(env, "IG_AUDIENCE_CANDIDATES", Config.audience_candidates, int),
        churn_interval=_env(env, "IG_CHURN_INTERVAL", Config.churn_interval, float),
        churn_horizon_days=_env(env, "IG_CHURN_HORIZON_DAYS", Config.churn_horizon_days, int),
        churn_tolerance=_env(env, "IG_CHURN_TOLERANCE", Config.churn_tolerance, float),
        churn_check=_env(env, "IG_CHURN_CHECK", Config.churn_check, float),
        serving_sync_wait=_env(env, "IG_SERVING_SYNC_WAIT", Config.serving_sync_wait, float),
        serving_poll=_env(env, "IG_SERVING_POLL", Config.serving_poll, float),
        serving_max_age=_env(env, "IG_SERVING_MAX_AGE", Config.serving_max_age, float),
        serving_start_wait=_env(env, "IG_SERVING_START_WAIT", Config.serving_start_wait, float),
        explain_table_mb=_env(env, "IG_EXPLAIN_TABLE_MB", Config.explain_table_mb, float),
        interest_history=_env(env, "IG_INTEREST_HISTORY", Config.interest_history, int),
        finetune_cron=_env(env, "IG_FINETUNE_CRON"),
        finetune_recent_days=_env(env, "IG_FINETUNE_RECENT_DAYS", Config.finetune_recent_days, float),
        finetune_check_days=_env(env, "IG_FINETUNE_CHECK_DAYS", Config.finetune_check_days, float),
        finetune_replay=_env(env, "IG_FINETUNE_REPLAY", Config.finetune_replay, float),
        finetune_rounds=_env(env, "IG_FINETUNE_ROUNDS", Config.finetune_rounds, int),
    )
    values["log_level"] = _choice(env, "IG_LOG_LEVEL", Config.log_level, ("DEBUG", "INFO", "WARNING", "ERROR"))
    values["log_format"] = _choice(env, "IG_LOG_FORMAT", Config.log_format, ("text", "json"))
    weights = _env(env, "IG_TYPE_WEIGHTS")
    if weights:
        values["type_weights"] = {**Config().type_weights, **_pairs(weights)}
    values.update(overrides)
    if not values.get("auth", True) and values["host"] not in LOOPBACK:
        raise ConfigError(f"IG_AUTH=off is for local runs only, but IG_HOST={values['host']} is not a loopback "
                         "address: set the tokens (IG_SERVICE_TOKEN, IG_PRIVACY_TOKEN) instead")
    if values["keepalive_requests"] < 0:
        raise ConfigError("IG_KEEPALIVE_REQUESTS must be 0 (no limit) or a number of answers, "
                          f"not {values['keepalive_requests']}")
    if values["explain_table_mb"] < 0:
        raise ConfigError(f"IG_EXPLAIN_TABLE_MB must be 0 (no table) or a size in MB, not {values['explain_table_mb']}")
    if values["train_minutes"] <= 0:
        raise ConfigError(f"IG_TRAIN_MINUTES must be a positive number of minutes, not {values['train_minutes']}")
    if values["model_alpha"] is not None and values["model_alpha"] <= 0:
        raise ConfigError(f"IG_MODEL_ALPHA must be positive (the stored vectors are the low-pass block), "
                          f"not {values['model_alpha']}")
    for key, name in (("table_edges", "IG_LIN_TABLE_EDGES"), ("table_k", "IG_LIN_TABLE_K"), ("table_mb", "IG_LIN_TABLE_MB")):
        if values[key] < (0 if key == "table_edges" else 1):
            raise ConfigError(f"{name} must be a {'non-negative' if key == 'table_edges' else 'positive'} number, not {values[key]}")
    if values["audience_candidates"] < 1:
        raise ConfigError(f"IG_AUDIENCE_CANDIDATES must be at least 1, not {values['audience_candidates']}")
    if values["search_trials"] < 0:
        raise ConfigError(f"IG_SEARCH_TRIALS must be 0 (no search) or a number of trials, not {values['search_trials']}")
    if values["kafka_partitions"] < 1 or values["consume_batch"] < 1:
        raise ConfigError("IG_KAFKA_PARTITIONS and IG_CONSUME_BATCH must be at least 1")
    if values["trend_weight"] and not ((values["item_bias"] or 0) > 0 and values["item_trend"] > 0):
        raise ConfigError("IG_TREND_WEIGHT needs item biases (IG_ITEM_BIAS > 0) and a trend half-life (IG_ITEM_TREND > 0)")
    return Config(**values)
