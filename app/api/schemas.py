"""Request and response models of the REST API, declared once: they validate requests and produce /openapi.json."""
from __future__ import annotations

import copy
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, RootModel, model_validator

from app.config import Config
from app.ingest.schema import EventIn, ItemIn

_SCHEMAS: dict = {}


class _Query(BaseModel):
    """Query parameters: unknown ones are ignored, and an empty value means the parameter is absent."""

    model_config = ConfigDict(extra="ignore")

    @classmethod
    def model_json_schema(cls, *args, **kwargs) -> dict:
        """The schema, built once per model and arguments: the request validator asks for it on every
        request, at a cost comparable with the recommendation itself. That call (no arguments) only reads it,
        so it gets the cached dict itself; the OpenAPI builder's calls get copies they may change."""
        key = (cls, args, tuple(sorted(kwargs.items())))
        if key not in _SCHEMAS:
            _SCHEMAS[key] = super().model_json_schema(*args, **kwargs)
        return _SCHEMAS[key] if not args and not kwargs else copy.deepcopy(_SCHEMAS[key])

    @model_validator(mode="before")
    @classmethod
    def _blank_is_absent(cls, values: Any) -> Any:
        # Forms and URL templates send `category=&max_price=` for "no filter".
        if isinstance(values, dict):
            return {k: v for k, v in values.items() if v not in ("", None)}
        return values


# --- paths ---------------------------------------------------------------------------------------
class UserPath(BaseModel):
    user_id: str = Field(description="The user's id (raw; pseudonymised internally when configured).")


class ItemPath(BaseModel):
    item_id: str


class JobPath(BaseModel):
    job_id: str


# --- queries and bodies ---------------------------------------------------------------------------
class FilterQuery(_Query):
    """Item filters: applied before the top k is cut, so they never shrink an answer that has enough items."""

    category: Optional[str] = Field(None, max_length=256, description="Only items of this category.")
    max_price: Optional[float] = Field(None, ge=0, allow_inf_nan=False, description="Only items priced at most this.")


class RecsQuery(FilterQuery):
    k: int = Field(20, ge=1, description="How many items (bounded by IG_MAX_K).")
    exclude_seen: bool = Field(True, description="Leave out items the user already interacted with.")
    explain: bool = Field(False, description="Add, per item, the user's own items that contributed most.")


class SimilarQuery(FilterQuery):
    k: int = Field(20, ge=1, description="How many items (bounded by IG_MAX_K).")


class AudienceQuery(_Query):
    k: int = Field(100, ge=1, description="How many users (bounded by IG_MAX_K and IG_AUDIENCE_CANDIDATES).")
    include_known: bool = Field(False, description="Keep users who already interacted with the item.")


class InterestsQuery(_Query):
    k: int = Field(10, ge=1, le=100, description="How many items and categories.")


class ChurnQuery(_Query):
    k: int = Field(50, ge=1, description="How many users (bounded by IG_CHURN_MAX_K).")
    min_events: int = Field(3, ge=2, le=1_000_000, description="Only users with at least this many events (with "
                                                               "stored scores: this many active days).")


class BatchRecsBody(BaseModel):
    """Recommendations for many users in one call (ad and e-mail systems)."""

    model_config = ConfigDict(extra="forbid")

    user_ids: list[str] = Field(min_length=1, description="Distinct user ids (bounded by IG_MAX_BATCH_USERS).")
    k: int = Field(20, ge=1, description="How many items per user (bounded by IG_MAX_K).")
    category: Optional[str] = Field(None, max_length=256)
    max_price: Optional[float] = Field(None, ge=0, allow_inf_nan=False)
    exclude_seen: bool = True
    explain: bool = False


class ReindexBody(BaseModel):
    mode: str = Field("incremental", description="incremental or full")


# --- responses -----------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")

    status: int
    message: str
    field: Optional[str] = Field(None, description="The request field at fault, when there is one.")


class ErrorOut(BaseModel):
    """The one error shape of every failure."""

    error: ErrorDetail


class Because(BaseModel):
    item_id: str
    title: Optional[str] = None
    weight: float = Field(description="The user's decayed weight on this item.")
    contribution: float = Field(description="This item's share of the recommended item's score.")
    from_content: Optional[bool] = Field(None, description="This item has no trained row: what it adds to the "
                                         "user's vector comes from its content (title, category, price).")


class SimilarItem(BaseModel):
    item_id: str
    score: float
    title: Optional[str] = None
    category: Optional[str] = None
    price: Optional[float] = None


class RecItem(SimilarItem):
    because: Optional[list[Because]] = Field(None, description="Only with explain=true.")
    bias: Optional[float] = Field(None, description="Only with explain=true and a version with item biases: the "
                                  "item's bias (learned, plus the live trend's), the part of the score that is no "
                                  "item of the user's; with every item's contribution it adds up to the score.")
    from_content: Optional[bool] = Field(None, description="Only with explain=true: the item has no trained row "
                                         "(new since the model version), so it is scored from its content: the "
                                         "mix of your scores of the items its title, category and price are like.")
    reason: Optional[str] = Field(None, description="Only with explain=true, for an item scored from its content.")


class RecsAnswer(BaseModel):
    source: str = Field(description="personal, or trending for a user unknown or not embedded yet.")
    version: Optional[str] = None
    refreshed_at: Optional[str] = Field(None, description="When the user's vector was last refreshed (ISO 8601).")
    results: list[RecItem]


class RecsOut(RecsAnswer):
    user_id: str


class BatchRecsOut(BaseModel):
    results: dict[str, RecsAnswer]


class SimilarOut(BaseModel):
    item_id: str
    version: Optional[str] = None
    results: list[SimilarItem]


class AudienceUser(BaseModel):
    user_id: str
    score: float


class AudienceOut(BaseModel):
    item_id: str
    version: Optional[str] = None
    results: list[AudienceUser]


class InterestItem(BaseModel):
    item_id: str
    title: Optional[str] = None
    category: Optional[str] = None
    weight: float


class InterestCategory(BaseModel):
    category: str
    weight: float


class Drift(BaseModel):
    at: str
    drift: Optional[float] = Field(description="Cosine distance from the vector of the previous refresh.")


class InterestsOut(BaseModel):
    user_id: str
    version: Optional[str] = None
    refreshed_at: Optional[str] = None
    items: list[InterestItem]
    categories: list[InterestCategory]
    history: list[Drift] = Field(description="Newest last, bounded length.")


class ChurnUser(BaseModel):
    model_config = ConfigDict(extra="allow")

    user_id: str
    score: float
    reasons: dict[str, Any]


class ChurnOut(BaseModel):
    results: list[ChurnUser]


class IngestReport(BaseModel):
    model_config = ConfigDict(extra="allow")

    accepted: int
    duplicates: int
    rejected: list[dict]
    quarantined: list[dict]


class ItemsReport(BaseModel):
    model_config = ConfigDict(extra="allow")

    upserted: int
    changed: int
    rejected: list[dict]


class PipelineOut(BaseModel):
    """The refresh pipeline's public state (the /ui page's system panel); worker identities stay admin-only."""
    lag_seconds: float
    last_refresh_at: Optional[int] = None  # epoch ms of the last run that did work
    model: Optional[dict] = None  # version, trained_at, metrics
    recent_runs: list[dict]  # newest first: mode, finished_at, seconds, changed_edges, users, items
    counts: dict[str, int]
    worker_active: bool


class LogOut(BaseModel):
    """The Kafka event log (IG_INGEST=kafka): events the consumer group has not folded into Neo4j yet."""
    topic: str
    group: str
    messages: Optional[int] = None  # None while the broker does not answer
    partitions: dict[str, int] = {}


class StatsOut(BaseModel):
    accepted: int
    duplicates: int
    rejected: int
    dropped: dict[str, int]
    pipeline: Optional[PipelineOut] = None
    ingest: str = "direct"  # direct, or kafka (events are counted above once the consumer folds them)
    log: Optional[LogOut] = None


class JobOut(BaseModel):
    model_config = ConfigDict(extra="allow")

    job_id: Optional[str] = None
    state: str


class Anything(RootModel[dict[str, Any]]):
    """A JSON object."""


# The bounds set by the configuration (IG_MAX_K and the like), which the views check: the models are
# built once at import, so the document of each app gets them here.
BOUNDS = {("/v1/users/{user_id}/recommendations", "k"): "max_k", ("/v1/items/{item_id}/similar", "k"): "max_k",
          ("/v1/items/{item_id}/audience", "k"): "audience_max_k", ("/v1/users/churn-risk", "k"): "churn_max_k"}


def document_bounds(doc: dict, cfg: Config) -> None:
    """Write the configured maxima into an app's OpenAPI document."""
    for path, ops in doc.get("paths", {}).items():
        for param in ops.get("get", {}).get("parameters", []):
            setting = BOUNDS.get((path, param["name"]))
            if setting:
                param["schema"]["maximum"] = getattr(cfg, setting)
    batch = doc.get("components", {}).get("schemas", {}).get("BatchRecsBody", {}).get("properties", {})
    if batch:
        batch["user_ids"]["maxItems"] = cfg.max_batch_users
        batch["k"]["maximum"] = cfg.max_k


# Bodies read as raw JSON arrays (validated element by element, with a partial-success report), so
# they are not validated by the framework; their schemas are added to the document here.
def _event_schema() -> dict:
    schema = EventIn.model_json_schema()
    schema["properties"]["ts"] = {"anyOf": [{"type": "string", "format": "date-time"}, {"type": "integer"}],
                                  "title": "Ts", "description": "RFC 3339 with an offset, or epoch milliseconds"}
    return schema


RAW_BODIES = {
    ("/v1/events", "post"): {"type": "array", "maxItems": Config.batch_limit, "items": _event_schema()},
    ("/v1/items", "put"): {"type": "array", "maxItems": Config.batch_limit, "items": ItemIn.model_json_schema()},
    ("/admin/reindex", "post"): ReindexBody.model_json_schema(),
}
