"""Serving endpoints: recommendations, similar items, audiences, interests and churn risk."""
from __future__ import annotations

from flask_openapi3 import APIBlueprint, Tag

from app.api import cfg, driver, serving_copy
from app.db import read_session
from app.api.schemas import (AudienceOut, AudienceQuery, BatchRecsBody, BatchRecsOut, ChurnOut, ChurnQuery,
                              ErrorOut, InterestsOut, InterestsQuery, ItemPath, RecsOut, RecsQuery, SimilarOut,
                              SimilarQuery, UserPath)
from app.errors import ApiError
from app.ids import user_key
from app.serving import churntop, profile, ranking
from app.serving.audience import audience as served_audience, user_ids
from app.serving.ranking import Filters

bp = APIBlueprint("recs", __name__, url_prefix="/v1", abp_tags=[Tag(name="serving")],
                  abp_responses={400: ErrorOut})


def _k(k: int, bound: int | None = None) -> int:
    """k within its configured bound (IG_MAX_K unless another is given)."""
    limit = cfg().max_k if bound is None else bound
    if k > limit:
        raise ApiError(400, f"k must be at most {limit}", field="k", limit=limit)
    return k


def _explained(st, k: int, explain: bool) -> int:
    """k within explain's bound (IG_EXPLAIN_MAX_MB)."""
    # Without the item-item table an explained answer builds a dense k x users block of 8-byte entries.
    if explain and st is not None and st.table is None and st.nbr is None and k * st.n_users * 8 > cfg().explain_max_mb * 2**20:
        most = int(cfg().explain_max_mb * 2**20 // (8 * st.n_users))
        raise ApiError(400, f"k must be at most {most} with explain=true over {st.n_users} users "
                            "(IG_EXPLAIN_MAX_MB)", field="k", limit=most)
    return k


def _state():
    """The state of this process's copy of the graph that an answer is scored on (one per answer, so
    versions never mix in it)."""
    return serving_copy().current()


def preload(app) -> None:
    """Start loading this process's copy of the graph now (a worker at start), in the background: until it
    has loaded, requests get 503 and /readyz says why."""
    with app.app_context():
        serving_copy().ready()


def _session():
    """One read session per request (sessions are not thread-safe; a cluster routes it to a reader)."""
    return read_session(driver(), cfg())


@bp.get("/users/<user_id>/recommendations", responses={200: RecsOut})
def recommendations(path: UserPath, query: RecsQuery):
    """Items for a user (personal), or trending items for a user unknown or not embedded yet."""
    filters = Filters(query.category, query.max_price, query.exclude_seen)
    st = _state()
    k = _explained(st, _k(query.k), query.explain)
    answer = ranking.recommend(_session, st, user_key(cfg(), path.user_id), k, filters, query.explain)
    return {"user_id": path.user_id, **answer}


@bp.post("/recommendations", responses={200: BatchRecsOut})
def batch_recommendations(body: BatchRecsBody):
    """The single-user answer for each of a bounded list of users, in one call."""
    if len(body.user_ids) > cfg().max_batch_users:
        raise ApiError(400, f"user_ids: at most {cfg().max_batch_users} users a call", field="user_ids")
    filters = Filters(body.category, body.max_price, body.exclude_seen)
    st = _state()
    k = _explained(st, _k(body.k), body.explain)
    users = list(dict.fromkeys(body.user_ids))
    work = st.work([user_key(cfg(), u) for u in users]) if st is not None else 0
    if work > cfg().batch_max_work:
        most = max(1, len(users) * cfg().batch_max_work // work)
        raise ApiError(413, f"user_ids: at most about {most} of these users a call over this graph "
                            f"({work} entries to read, IG_BATCH_MAX_WORK {cfg().batch_max_work})",
                       field="user_ids", limit=most)
    return {"results": {u: ranking.recommend(_session, st, user_key(cfg(), u), k, filters, body.explain)
                        for u in users}}


@bp.get("/items/<item_id>/similar", responses={200: SimilarOut, 404: ErrorOut})
def similar(path: ItemPath, query: SimilarQuery):
    """Items a shopper who has only this item would be recommended, within the filters."""
    answer = ranking.similar(_state(), path.item_id, _k(query.k), Filters(query.category, query.max_price))
    return {"item_id": path.item_id, **answer}


@bp.get("/items/<item_id>/audience", responses={200: AudienceOut, 404: ErrorOut})
def audience(path: ItemPath, query: AudienceQuery):
    """Users most likely to want an item (ad targeting), by their full recommendation score for it;
    `include_known=true` keeps those who have it."""
    k = _k(query.k, cfg().audience_max_k)
    st, item_id = _state(), path.item_id
    users, scores = served_audience(st, ranking.embedded(st, item_id), k, query.include_known,
                                    cfg().audience_candidates)
    return {"item_id": item_id, "version": st.lm.version,
            "results": [{"user_id": u, "score": s} for u, s in zip(user_ids(st)[users].tolist(), scores.tolist())]}


@bp.get("/users/<user_id>/interests", responses={200: InterestsOut, 404: ErrorOut})
def interests(path: UserPath, query: InterestsQuery):
    """The items and categories that weigh most in the user's interest now, and how the vector moved."""
    with _session() as s:
        return profile.interests(s, user_key(cfg(), path.user_id), path.user_id, query.k)


@bp.get("/users/churn-risk", responses={200: ChurnOut})
def churn_risk(query: ChurnQuery):
    """Users most likely not to come back (the stored churn scores, kept in this process), with the reasons;
    before a first scoring run, users most overdue against their own rhythm."""
    c = cfg()
    k = _k(query.k, c.churn_max_k)
    with _session() as s:
        rows = churntop.top(driver(), s, c.neo4j_database, k, query.min_events, c.churn_max_k, c.churn_check)
        return {"results": rows if rows is not None else profile.churn_risk(s, k, query.min_events, c.churn_max_edges)}
