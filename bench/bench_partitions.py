"""Training's heavy part on a partitioned graph: the item basis from two DistDGL partitions of Gowalla.

The model's training cost is the randomised SVD of the normalised user-item matrix R~ (the rest is
a few coefficients). Here Gowalla's graph is split in two by DGL's own partitioner
(`dgl.distributed.partition_graph`, METIS, as DistDGL uses it); each partition holds the edges of
the users it owns. The SVD runs as it would across machines: every step is a product with one
partition's rows, and what partitions exchange is a dense items x (k + oversampling) block per
pass (an all-reduce) plus the k x k factors of a tall-skinny QR. It prints each partition's compute
time and the bytes exchanged, and checks that the basis spans what the single-machine
`spectral.item_basis` finds (the singular values agree, the principal angles are small).

`.venv/bin/python -m bench.bench_partitions [--k 256]` (about a minute on Gowalla, 2 cores).
"""
from __future__ import annotations

import argparse
import tempfile
import time

import dgl
import numpy as np
import scipy.sparse as sp
import torch

from graph_models.gowalla import load_split
from scipy.sparse.linalg import svds

from graph_models.spectral import inv_sqrt, item_basis, normalised
from bench.bench_refresh import DATA


def partitions(train: sp.csr_matrix, parts: int, out: str) -> list[sp.csr_matrix]:
    """Partition the user-item graph with DGL; each partition's owned users' rows, global columns."""
    coo = train.tocoo()
    u, i = torch.from_numpy(coo.row).long(), torch.from_numpy(coo.col).long()
    g = dgl.heterograph({("user", "interacted", "item"): (u, i), ("item", "rev", "user"): (i, u)},
                        num_nodes_dict={"user": train.shape[0], "item": train.shape[1]})
    dgl.distributed.partition_graph(g, "gowalla", parts, out, part_method="metis", balance_edges=True,
                                    return_mapping=False)
    rows = []
    for p in range(parts):
        _, _, _, book, *_ = dgl.distributed.load_partition(f"{out}/gowalla.json", p)
        # ('item', 'rev', 'user') edges sit with their destination: all the edges of the users p owns.
        users = book.partid2nids(p, "user").numpy()
        rows.append(train[users])
    return rows


def distributed_basis(rows: list[sp.csr_matrix], k: int, niter: int, seed: int):
    """Randomised SVD of R~ = stacked rows, touching each partition only through local products."""
    t = np.zeros(len(rows))
    item_deg = sum(np.asarray(r.sum(axis=0)).ravel() for r in rows)  # all-reduce of item degrees
    di = inv_sqrt(item_deg)
    local = [sp.diags(inv_sqrt(np.asarray(r.sum(axis=1)).ravel())) @ r.astype(np.float64) @ sp.diags(di)
             for r in rows]
    q = k + 32
    omega = np.random.default_rng(seed).standard_normal((rows[0].shape[1], q))
    exchanged = 0

    def step(p, f):
        start = time.perf_counter()
        out = f(local[p])
        t[p] += time.perf_counter() - start
        return out

    for _ in range(niter):  # power iterations: Z = R~^T (R~ Z), summed over partitions
        omega = sum(step(p, lambda m: m.T @ (m @ omega)) for p in range(len(local)))
        omega, _ = np.linalg.qr(omega)
        exchanged += omega.nbytes * len(local)
    ys = [step(p, lambda m: m @ omega) for p in range(len(local))]
    # Tall-skinny QR: local QRs, then one QR of the stacked R factors (k x k each travels).
    qrs = [np.linalg.qr(y) for y in ys]
    q2, _ = np.linalg.qr(np.vstack([r for _, r in qrs]))
    exchanged += sum(r.nbytes for _, r in qrs)
    blocks = np.split(q2, len(local))
    qs = [ql @ b for (ql, _), b in zip(qrs, blocks)]
    b = sum(step(p, lambda m: (m.T @ qs[p]).T) for p in range(len(local)))  # B = Q^T R~, all-reduced
    exchanged += b.nbytes * len(local)
    _, s, vt = np.linalg.svd(b, full_matrices=False)
    return vt[:k].T, s[:k] ** 2, t, exchanged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=256)
    parser.add_argument("--parts", type=int, default=2)
    args = parser.parse_args()
    train, *_ = load_split(str(DATA))
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        rows = partitions(train, args.parts, out)
        split_s = time.perf_counter() - start
    start = time.perf_counter()
    v, s2, per_part, exchanged = distributed_basis(rows, args.k, niter=4, seed=0)
    dist_s = time.perf_counter() - start
    start = time.perf_counter()
    v1, s1 = item_basis(train, args.k, seed=0, niter=4)
    single_s = time.perf_counter() - start
    top = min(32, args.k)
    _, s_exact, vt_exact = svds(normalised(train), k=top, solver="propack")
    exact = (vt_exact.T, s_exact ** 2)

    def agreement(basis, s2_):
        """Largest relative error of the top singular values, smallest cosine of the principal angles."""
        order = np.argsort(-exact[1])
        rel = np.abs(s2_[:top] - exact[1][order]) / exact[1][order]
        return rel.max(), np.linalg.svd(basis[:, :top].T @ exact[0], compute_uv=False).min()
    print(f"Gowalla {train.nnz:,} edges, {args.parts} METIS partitions in {split_s:.1f}s: "
          + ", ".join(f"part {p}: {r.shape[0]:,} users, {r.nnz:,} edges" for p, r in enumerate(rows)))
    print(f"randomised SVD, k={args.k}: partition compute " + ", ".join(f"{x:.1f}s" for x in per_part)
          + f"; exchanged {exchanged / 1e6:.0f} MB in all; whole distributed run {dist_s:.1f}s in one process;"
          f" single machine (torch.svd_lowrank) {single_s:.1f}s")
    for label, basis, values in (("partitioned", v, s2), ("single machine", v1, s1)):
        err, cos = agreement(basis, values)
        print(f"{label:>15} against the exact top {top} (PROPACK): singular values within {err:.1e} (relative), "
              f"smallest principal-angle cosine {cos:.6f}")


if __name__ == "__main__":
    main()
