"""What the exactness soak measures once it has drained, and which of its promises broke (support/soak.py)."""
from __future__ import annotations

import math
from collections import Counter

from app.embeddings import models
from support.refresh import TYPES, max_error

TOLERANCE = 1e-9
JOBS = "MATCH (j:Job) RETURN j.kind AS kind, j.state AS state, coalesce(j.attempts, 0) AS attempts"
MODEL_VERSIONS = "MATCH (m:Model) RETURN collect(m.version) AS versions"
EVENTS_FOUND = "UNWIND $ids AS id MATCH (e:Event {id: id}) RETURN count(e) AS n"
EVENTS_ALL = "MATCH (e:Event) RETURN count(e) AS n"
EDGES = """
MATCH (u:User)-[r:INTERACTED]->(i:Item) WHERE NOT u.id IN $erasable + $again
RETURN u.id AS u, i.id AS i, properties(r) AS p
"""
ZERO_USERS = """
MATCH (u:User) WHERE u.id STARTS WITH 'z'
OPTIONAL MATCH (u)-[r:INTERACTED]->()
RETURN u.id AS id, u.ig_deg AS deg, u.embedding IS NULL AS unembedded, collect(r.w) AS w
"""
STORED_VERSIONS = "MATCH (n) WHERE n:User OR n:Item RETURN labels(n)[0] + ' ' + coalesce(n.embedding_version, '-') AS v"


def report(soak, drained: bool, erasable: list, again: list) -> dict:
    """Everything a `Soak` promises, measured once drained (edge counts checked but for the users of
    `erasable` and `again`): see `problems` for what must hold."""
    lm = models.current(soak.driver, soak.cfg)
    worst = max_error(soak.driver, soak.cfg, lm) if drained else math.inf
    with soak.driver.session(database=soak.cfg.neo4j_database) as s:
        versions = set(s.run(MODEL_VERSIONS).single()["versions"])
        found = s.run(EVENTS_FOUND, ids=sorted(soak.accepted)).single()["n"]
        total = s.run(EVENTS_ALL).single()["n"]
        edges = {(r["u"], r["i"]): r["p"] for r in s.run(EDGES, erasable=erasable, again=again)}
        zero = [r.data() for r in s.run(ZERO_USERS)]
        jobs = [r.data() for r in s.run(JOBS)]
        stored = Counter(r["v"] for r in s.run(STORED_VERSIONS))
    wrong_edges = []
    for key in sorted(set(edges) | set(soak.counts)):
        want, got = soak.counts.get(key, Counter()), edges.get(key)
        have = got and {k: got.get(k, 0) for k in [f"n_{t}" for t in TYPES] + ["qty"]}
        if have != {k: want.get(k, 0) for k in [f"n_{t}" for t in TYPES] + ["qty"]}:
            wrong_edges.append((key, dict(want), have))
    compared = drained and soak.compare_rankings
    rankings = soak.rankings(lm) if compared else []
    kept = [z for z in zero if any(w != 0.0 for w in z["w"]) or z["deg"] != 0.0 or not z["unembedded"]]
    answers = Counter(a[0] for a in soak.answers)
    # An empty answer without a version (the user already re-embedded by a retrain, no item yet)
    # mixes nothing; it is counted apart.
    empty = sum(1 for a in soak.answers if a[0] == 200 and a[1] is None and not a[2])
    mixed = [a for a in soak.answers if a[0] == 200 and (a[1] is not None or a[2]) and (
        a[1] not in versions or len(set(a[2])) != len(a[2]) or len(a[2]) > 10)]
    return {
        "drained": drained, "worst": worst, "current": lm.version, "models": len(versions),
        "stored_versions": dict(stored),
        "events": soak.sent["events"], "batches": soak.sent["batches"], "resent": soak.sent["resent"],
        "item_updates": soak.sent["item_updates"], "erasures": soak.sent["erasures"],
        "recreated_in_full_runs": soak.sent["recreated_in_full_runs"],
        "accepted": len(soak.accepted), "lost_events": len(soak.accepted) - found,
        "unexpected_events": total - found, "wrong_edges": wrong_edges[:10], "n_wrong_edges": len(wrong_edges),
        "zero_users": len(zero),
        "nonzero_users": kept[:5],
        "runs": dict(Counter(soak.runs.values())),
        "jobs": dict(Counter(f"{j['kind']} {j['state']}" for j in jobs)),
        "job_attempts": max((j["attempts"] for j in jobs), default=0),
        "cli": len(soak.cli), "answers": sum(answers.values()), "answer_statuses": dict(answers),
        "versions_seen": dict(Counter(a[1] for a in soak.answers if a[0] == 200 and a[1])),
        "empty_answers": empty, "mixed": mixed[:5],
        "table_k": lm.mcfg.lin_topk, "rankings_compared": compared, "wrong_rankings": rankings,
        "failures": soak.failures[:20], "n_failures": len(soak.failures),
    }


def problems(report: dict) -> list[str]:
    """What broke a promise of the soak (empty when everything held)."""
    out = []
    if not report["drained"]:
        out.append("the worker did not drain")
    if not report["worst"] <= TOLERANCE:
        out.append(f"worst difference from a full recompute {report['worst']:.3g} > {TOLERANCE:g}")
    if report["wrong_rankings"]:
        out.append(f"served rankings unlike the offline Scorer's: {report['wrong_rankings'][:3]}")
    if report["mixed"]:
        out.append(f"answers of unknown or mixed version: {report['mixed']}")
    if report["n_failures"]:
        out.append(f"{report['n_failures']} failed requests or jobs, first: {report['failures'][:5]}")
    if report["lost_events"] or report["unexpected_events"]:
        out.append(f"events lost {report['lost_events']}, unexpected {report['unexpected_events']}")
    if report["n_wrong_edges"]:
        out.append(f"{report['n_wrong_edges']} edges with wrong counts, first: {report['wrong_edges'][:3]}")
    if report["nonzero_users"]:
        out.append(f"users whose weights cancel kept weight or a vector: {report['nonzero_users'][:3]}")
    if any(not state.endswith("succeeded") for state in report["jobs"]):
        out.append(f"jobs not succeeded: {report['jobs']}")
    return out
