"""The read path as the graph grows: one recommendation's work on power-law graphs of 10k, 1M and 10M
edges, with the graph filter exact (two sparse products over every edge) and from the item table (the
candidates the shopper's items' rows reach), reading every candidate's row of q ("rows") or bounding
them first as `serve` does ("table", which ranks as "rows" but where two scores tie to float32's last
bit), side by side in one run.

Each graph is bench_scale's (N/10 uniform users, N/50 Pareto items, weight 1), held in memory as an API
process holds its copy (app/serving/state.py `built`, no Neo4j: what is measured is the request's own
work, not the network or Flask), under a version of 64 + 16 components as `make bench-scale` sets. For
each size and path: the time to build the copy, the process's resident memory grown by it, and
sequential requests (one thread) for sampled shoppers: k = 20 plain, with `explain`, with a price
cap admitting about a third of the items, and with one admitting about 1 in 3,000; p50 and p99 of
each request's CPU time and wall time, in ms, and the MB of arrays the copy holds; and the audience
(k = 100) of 50 sampled items. The table's ranking is compared with the
exact one on the same shoppers: overlap of the top 20 and Recall@20 of the exact top 20.

`make bench-scale` runs it after bench_scale; alone: `.venv/bin/python -m bench.bench_readpath`.
"""
from __future__ import annotations

import argparse
import gc
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as `serve` runs: a request's CPU is then its thread's
import numpy as np  # noqa: E402
import psutil  # noqa: E402
import scipy.sparse as sp  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from app.config import Config  # noqa: E402
from app.embeddings.models import LoadedModel  # noqa: E402
from app.serving import scoring  # noqa: E402
from app.serving.audience import audience  # noqa: E402
from app.serving.ranking import Filters, recommend  # noqa: E402
from app.serving.state import Index, Rows, State, built  # noqa: E402
from bench.bench_scale import power_law_keys  # noqa: E402
from graph_models import ModelConfig  # noqa: E402
from graph_models.spectral import table_topk  # noqa: E402
from graph_models.train import build  # noqa: E402

VARIANTS = {"plain": ({}, False), "explain": ({}, True), "max_price": ({"max_price": 10.0}, False),
            "max_price=0.01": ({"max_price": 0.01}, False)}
AUDIENCE_CANDIDATES = Config.audience_candidates
BOUND_FROM = scoring.BOUND_FROM


def rss_mb() -> float:
    """This process's resident memory, MB."""
    return psutil.Process().memory_info().rss / 1e6


def copy_of_graph(users: np.ndarray, items: np.ndarray, n_items: int, lm: LoadedModel) -> State:
    """The API's copy of a graph of edges (users[k], items[k]), every item priced 0-30."""
    order = np.lexsort((items, users))
    users, items = users[order], items[order]
    n_users = int(users.max()) + 1
    rows = Rows(np.searchsorted(users, np.arange(n_users + 1)), items.astype(np.int64),
                np.ones(len(items)), np.zeros(len(items)))
    index = Index(f"u{u}" for u in range(n_users))
    price = np.random.default_rng(1).uniform(0, 30, n_items)
    item_rows = [{"id": f"i{j}", "title": None, "category": None, "price": float(price[j]), "version": lm.version}
                 for j in range(n_items)]
    return built("bench", 0, 0, lm, index, np.full(n_users, None, dtype=object), rows, item_rows, {}, 0)


def timed(st: State, users: list[str], variant: str) -> tuple[list[float], list[float], list[list[str]]]:
    """Wall and CPU seconds of each request for `users` (CPU: this thread's, which other processes on a
    busy host do not inflate), and each answer's item ids."""
    filters, explain = VARIANTS[variant]
    wall, cpu, ids = [], [], []
    for u in users:
        t0, c0 = time.perf_counter(), time.thread_time()
        answer = recommend(None, st, u, 20, Filters(**filters), explain)
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - t0)
        ids.append([r["item_id"] for r in answer["results"]])
    return wall, cpu, ids


def audience_ms(st: State, items: np.ndarray, k: int = 100) -> tuple[float, float]:
    """CPU ms p50 / p99 of an item's audience (k users, app/serving/audience.py) for each of `items`."""
    cpu = []
    for j in items:
        c0 = time.thread_time()
        audience(st, int(j), k, False, AUDIENCE_CANDIDATES)
        cpu.append(time.thread_time() - c0)
    return tuple(1e3 * float(np.percentile(cpu, q)) for q in (50, 99))


def footprint_mb(st: State) -> float:
    """MB of the arrays a state holds (numpy arrays and sparse matrices among its fields and items), and
    the version's tables, which every state of the version shares."""
    def size(x) -> int:
        if isinstance(x, np.ndarray):
            return x.nbytes
        if sp.issparse(x):
            return sum(a.nbytes for a in (x.data, x.indices, x.indptr))
        return 0
    parts = [getattr(st, f) for f in st.__dataclass_fields__] + list(vars(st.items).values()) + list(vars(st.rows).values())
    return (sum(size(x) for x in parts) + sum(t.nbytes for t in st.lm.tables) + st.lm.q32.nbytes) / 1e6


def alternated(st: State, users: list[str], rng) -> dict[str, list[float]]:
    """CPU seconds of each plain request for `users` reading every candidate's row of q ("rows") and
    bounding them first ("table"), the two in random order request by request so that both see the same
    host; "differ" counts the answers whose order differs (two scores equal to float32's last bit
    can swap: each way sums a row's p . q_j in blocks of its own size)."""
    cpu: dict[str, list[float]] = {"rows": [], "table": [], "differ": []}
    for u in users:
        ids = {}
        for path in rng.permutation(["rows", "table"]):
            scoring.BOUND_FROM = 10**12 if path == "rows" else BOUND_FROM
            c0 = time.thread_time()
            answer = recommend(None, st, u, 20, Filters(), False)
            cpu[path].append(time.thread_time() - c0)
            ids[path] = [r["item_id"] for r in answer["results"]]
        cpu["differ"].append(ids["rows"] != ids["table"])
    scoring.BOUND_FROM = BOUND_FROM
    return cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,1000000,10000000")
    parser.add_argument("--requests", type=int, default=1000, help="requests per size, path and variant")
    parser.add_argument("--exact-requests", type=int, default=200, help="the exact path's requests at 10M edges")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--alternate", action="store_true",
                        help="only the table path, reading every row and bounding them in turn, request by request")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    rows = []
    for size in (int(x) for x in args.sizes.split(",") if x):
        u, i, n_items = power_law_keys(size, args.seed)
        csr = sp.csr_matrix((np.ones(len(u)), (u, i)), shape=(int(u.max()) + 1, n_items))
        t0 = time.perf_counter()
        cfg = ModelConfig(dim=64, sharp_dim=16, search_trials=0)
        model = build(csr, cfg).double().eval()
        basis_s = time.perf_counter() - t0
        sample = [f"u{x}" for x in rng.choice(csr.shape[0], args.requests, replace=False)]
        answers = {}
        topk_table = table_topk(csr.nnz, n_items, cfg) or cfg.table_k
        # "rows": the table path reading every candidate's row of q; "table": bounding them first (as served)
        paths = (("table", topk_table),) if args.alternate else (("exact", 0), ("rows", topk_table), ("table", topk_table))
        for path, topk in paths:
            scoring.BOUND_FROM = 10**12 if path == "rows" else BOUND_FROM
            mcfg = ModelConfig(**{**cfg.to_dict(), "lin_topk": topk})
            lm = LoadedModel(f"bench-{size}-{path}", model, mcfg,
                             {"ref_ms": 0, "decay_anchor_ms": 0, "half_life_days": 1.0,
                              "item_ids": [f"i{j}" for j in range(n_items)]},
                             {f"i{j}": j for j in range(n_items)})
            gc.collect()
            t0 = time.perf_counter()
            st = copy_of_graph(u, i, n_items, lm)
            _ = lm.q32, lm.tables
            row = {"edges": size, "users": csr.shape[0], "items": n_items, "path": path, "topk": topk,
                   "build_s": time.perf_counter() - t0, "basis_s": basis_s, "mb": footprint_mb(st), "rss_mb": rss_mb()}
            n = args.exact_requests if path == "exact" and size >= 10_000_000 else args.requests
            timed(st, sample[:20], "plain")  # warm
            if args.alternate:
                cpu = alternated(st, sample, rng)
                print(f"{size:>10,} edges, plain, CPU ms p50 / p99: every candidate's row "
                      f"{1e3 * np.percentile(cpu['rows'], 50):.3f} / {1e3 * np.percentile(cpu['rows'], 99):.3f}, "
                      f"bounded {1e3 * np.percentile(cpu['table'], 50):.3f} / {1e3 * np.percentile(cpu['table'], 99):.3f} "
                      f"; answers in another order {sum(cpu['differ'])} of {len(sample)} "
                      f"(load average {os.getloadavg()[0]:.1f})", flush=True)
                continue
            for variant in VARIANTS:
                wall, cpu, ids = timed(st, tqdm(sample[:n], desc=f"{size:,} {path} {variant}", leave=False,
                                                mininterval=10), variant)
                row[variant] = tuple(1e3 * float(np.percentile(x, q)) for x in (cpu, wall) for q in (50, 99))
                if variant == "plain":
                    answers[path] = ids
            audience(st, 0, 100, False, AUDIENCE_CANDIDATES)  # warm
            row["audience"] = audience_ms(st, rng.choice(n_items, 50, replace=False))
            if path == "table":
                row["differ"] = sum(a != b for a, b in zip(answers["table"], answers["rows"]))
                pairs = list(zip(answers["exact"], answers["table"][:len(answers["exact"])]))
                row["overlap"] = float(np.mean([len(set(a) & set(b)) / max(1, len(a)) for a, b in pairs]))
            rows.append(row)
            print(f"{size:>10,} edges {path:5s} k={topk:<4d} build {row['build_s']:6.1f}s held {row['mb']:6.0f} MB "
                  f"(process RSS {row['rss_mb']:.0f} MB) CPU ms p50/p99, wall ms p50/p99: "
                  + " ".join(f"{v} {row[v][0]:.2f}/{row[v][1]:.2f}, {row[v][2]:.2f}/{row[v][3]:.2f}" for v in VARIANTS)
                  + f" audience k=100 CPU {row['audience'][0]:.2f}/{row['audience'][1]:.2f}"
                  + (f" top-20 overlap with exact {row['overlap']:.3f}" if "overlap" in row else "")
                  + (f", answers in another order than rows' {row['differ']}" if "differ" in row else ""), flush=True)
            del st, lm
        del csr, model, u, i
        gc.collect()
    if not rows:  # --alternate printed its lines
        return
    base = {r["path"]: r for r in rows if r["edges"] == rows[0]["edges"]}
    print(f"\nCPU ms per request (one thread), p50 / p99; the wall times are in the lines above")
    others = [v for v in VARIANTS if v != "plain"]
    print(f"{'edges':>11} {'path':>6} {'plain':>13} {'p50 vs 10k':>10} "
          + " ".join(f"{v:>15}" for v in others + ["audience"]) + f" {'held MB':>8} {'build s':>7} {'top-20 overlap':>14}")
    for r in rows:
        print(f"{r['edges']:11,d} {r['path']:>6} {r['plain'][0]:6.2f}/{r['plain'][1]:6.2f} "
              f"{r['plain'][0] / base[r['path']]['plain'][0]:9.2f}x "
              + " ".join(f"{r[v][0]:7.2f}/{r[v][1]:7.2f}" for v in others + ["audience"])
              + f" {r['mb']:8.0f} {r['build_s']:7.1f} {r.get('overlap', float('nan')):14.3f}")

if __name__ == "__main__":
    main()
