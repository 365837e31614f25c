"""Full-ranking Recall@K / NDCG@K with training items excluded (LightGCN/NGCF protocol)."""
import numpy as np
import torch
from tqdm.auto import tqdm


def recall_at_k(topk, truth, k):
    """Mean over users of |top-k ∩ truth| / |truth|, in [0, 1]; users with empty truth skipped."""
    vals = [len(set(map(int, row[:k])) & t) / len(t) for row, t in zip(topk, truth) if t]
    return float(np.mean(vals)) if vals else 0.0


def ndcg_at_k(topk, truth, k):
    """Mean binary-relevance NDCG@k, IDCG over min(|truth|, k) hits, in [0, 1]."""
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    vals = []
    for row, t in zip(topk, truth):
        if not t:
            continue
        hits = np.array([int(x) in t for x in row[:k]], dtype=np.float64)
        vals.append((hits * disc[: len(hits)]).sum() / disc[: min(len(t), k)].sum())
    return float(np.mean(vals)) if vals else 0.0


def top_k(scores, exclude_rows, k):
    """Top-k item ids per row of a score matrix after masking each row's excluded items."""
    scores = torch.as_tensor(scores).clone()
    if exclude_rows is not None and exclude_rows.nnz:
        r, c = exclude_rows.nonzero()
        r, c = torch.as_tensor(r, dtype=torch.int64), torch.as_tensor(c, dtype=torch.int64)
        scores[r, c] = -np.inf
    return torch.topk(scores, k, dim=1).indices.numpy()


def evaluate(score_fn, truth, exclude, k=20, batch_size=1024, progress=False):
    """Recall@k and NDCG@k of score_fn(user_rows) -> scores[len(users), n_items] over all items.

    `truth` maps user row -> set of held-out item rows; `exclude` is a scipy CSR
    users x items matrix of items never to recommend (the user's training items).
    Users are scored in batches so the full user x item matrix never exists at once.
    """
    users = np.array(sorted(u for u, t in truth.items() if t), dtype=np.int64)
    rec, ndcg = [], []
    steps = range(0, len(users), batch_size)
    for s in tqdm(steps, desc="evaluate", disable=not progress, leave=False):
        batch = users[s:s + batch_size]
        ids = top_k(score_fn(batch), exclude[batch] if exclude is not None else None, k)
        t = [truth[int(u)] for u in batch]
        rec.append(recall_at_k(ids, t, k) * len(batch))
        ndcg.append(ndcg_at_k(ids, t, k) * len(batch))
    n = max(len(users), 1)
    return {f"recall@{k}": sum(rec) / n, f"ndcg@{k}": sum(ndcg) / n, "users": int(len(users))}
