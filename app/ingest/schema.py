"""Field-level validation of incoming events and item metadata (pydantic v2)."""
from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, StrictStr, TypeAdapter, ValidationError, \
    ValidationInfo, field_validator

from app.ingest import decay

# Bounds on every value (docs/reliability.md lists them): beyond one, the element is rejected (422).
MAX_ID = 256  # characters of an event, user or item id
MAX_TITLE = 1_000  # characters of an item title
MAX_CATEGORY = 256
MAX_ATTRIBUTES = 64  # attributes of one item
MAX_ATTR_TEXT = 1_000  # characters of a text attribute
# |weight|: times the largest decay factor (2^900) and summed over a batch it stays far below float64's
# 1.8e308, so no event can make an edge weight (and its transaction, shared with other clients) overflow.
MAX_WEIGHT = 1_000_000.0
MAX_INT = 2**63 - 1  # Neo4j integers are 64-bit


def _encodable(value: str) -> str:
    """Refuse lone surrogates: JSON allows them, UTF-8 (and so Neo4j) does not."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (it holds a lone surrogate)") from None
    return value


def _text(limit: int):
    return Annotated[StrictStr, Field(max_length=limit), AfterValidator(_encodable)]


Id = Annotated[Union[StrictStr, Annotated[StrictInt, Field(ge=-MAX_INT, le=MAX_INT)]], Field()]
Number = Annotated[float, Field(allow_inf_nan=False)]
Scalar = Union[_text(MAX_ATTR_TEXT), Annotated[StrictInt, Field(ge=-MAX_INT, le=MAX_INT)],
               Annotated[float, Field(allow_inf_nan=False, strict=True)], bool]
_ATTR_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")


def _id(value) -> str:
    text = _encodable(str(value).strip())
    if not text:
        raise ValueError("must not be empty")
    if len(text) > MAX_ID:
        raise ValueError(f"must be at most {MAX_ID} characters")
    return text


def parse_ts(value) -> int:
    """RFC 3339 text (with an offset) or epoch milliseconds -> epoch milliseconds."""
    if isinstance(value, int):
        return value
    try:
        parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"{value!r} is neither RFC 3339 nor epoch milliseconds") from None
    if parsed.tzinfo is None:
        raise ValueError(f"{value!r} has no time zone offset (RFC 3339 needs one, e.g. 'Z')")
    return int(parsed.timestamp() * 1000)


class EventIn(BaseModel):
    """One interaction event as posted to /v1/events."""

    model_config = ConfigDict(extra="ignore")

    event_id: StrictStr
    user_id: Id
    item_id: Id
    type: StrictStr
    ts: int
    quantity: Number | None = None
    price: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    weight: Annotated[float, Field(ge=-MAX_WEIGHT, le=MAX_WEIGHT, allow_inf_nan=False)] | None = None

    _ids = field_validator("event_id", "user_id", "item_id")(lambda cls, v: _id(v))

    @field_validator("ts", mode="before")
    @classmethod
    def _ts(cls, value, info: ValidationInfo) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError("must be RFC 3339 text or integer epoch milliseconds")
        ms = parse_ts(value)
        cfg = (info.context or {}).get("cfg")
        if cfg is not None and not decay.in_range(cfg, ms):
            raise ValueError(f"{value!r} is more than {decay.MAX_HALF_LIVES:.0f} half-lives from the "
                             f"decay anchor {cfg.decay_anchor}")
        return ms


class ItemIn(BaseModel):
    """Item metadata as put to /v1/items."""

    model_config = ConfigDict(extra="ignore")

    item_id: Id
    title: _text(MAX_TITLE) | None = None
    category: _text(MAX_CATEGORY) | None = None
    price: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    attributes: Annotated[dict[str, Scalar], Field(max_length=MAX_ATTRIBUTES)] | None = None

    _ids = field_validator("item_id")(lambda cls, v: _id(v))

    @field_validator("attributes")
    @classmethod
    def _keys(cls, value):
        for key in value or {}:
            if not _ATTR_KEY.match(key):
                raise ValueError(f"attribute name {key!r} must be a letter then letters, digits or _")
        return value


_EVENTS = TypeAdapter(list[EventIn])
_ITEMS = TypeAdapter(list[ItemIn])
_EVENT = TypeAdapter(EventIn)
_ITEM = TypeAdapter(ItemIn)


def _problem(index: int, error: dict) -> dict:
    """A pydantic error as {"index", "field", "error"}."""
    # Keep the field (and an attribute's key), not pydantic's union-branch tags like `.str`.
    loc = [str(p) for p in error["loc"]][:2 if error["loc"][:1] == ("attributes",) else 1]
    message = error["msg"].removeprefix("Value error, ")
    return {"index": index, "field": ".".join(loc) or None, "error": message}


def _validate(raw: list, whole: TypeAdapter, one: TypeAdapter, context: dict):
    """Validate a batch: one fast call when all is well, per element only to isolate failures."""
    try:
        return list(enumerate(whole.validate_python(raw, context=context))), []
    except ValidationError:
        pass
    valid, rejected = [], []
    for index, item in enumerate(raw):
        try:
            valid.append((index, one.validate_python(item, context=context)))
        except ValidationError as exc:
            rejected.append(_problem(index, exc.errors(include_url=False)[0]))
    return valid, rejected


def validate_events(raw: list, cfg) -> tuple[list[tuple[int, EventIn]], list[dict]]:
    """Split a batch into (index, event) pairs and one problem per rejected event."""
    return _validate(raw, _EVENTS, _EVENT, {"cfg": cfg})


def validate_items(raw: list) -> tuple[list[tuple[int, ItemIn]], list[dict]]:
    """Split an item batch into (index, item) pairs and one problem per rejected item."""
    return _validate(raw, _ITEMS, _ITEM, {})
