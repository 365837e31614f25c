"""Link-prediction training of InterestSAGE: sampled softmax over in-batch + uniform negatives."""
import copy
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .evaluation import embedding_scorer, evaluate
from .graph import graph_to_csr
from .sampler import EdgeBatchSampler, seed_everything


def softmax_loss(user_emb, item_emb, u_pos, i_pos, neg_pos, temperature):
    """Sampled softmax (InfoNCE) of each (user, item) edge against the batch's shared negatives.

    Scores are cosines / temperature, the same ranking serving uses. A negative
    that equals the row's own positive is masked out rather than pushed down.
    """
    users = user_emb[u_pos]
    pos = (users * item_emb[i_pos]).sum(-1, keepdim=True)
    neg = users @ item_emb[neg_pos].T
    neg = neg.masked_fill(neg_pos.unsqueeze(0) == i_pos.unsqueeze(1), float("-inf"))
    logits = torch.cat([pos, neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(u_pos), dtype=torch.int64))


def validate(model, g, item_feats, truth, exclude, k):
    """Recall/NDCG@k of full-neighbourhood embeddings on held-out validation edges."""
    model.eval()
    emb = model.inference(g, item_feats)["emb"]
    return evaluate(embedding_scorer(emb["user"], emb["item"]), truth, exclude, k)


def _tensorboard(log_dir):
    """A SummaryWriter if TensorBoard is installed and asked for, else None."""
    if not log_dir:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir)


def train(g, model, cfg, item_feats=None, val=None, progress=True, log_dir=None):
    """Train `model` on graph `g`; early-stop on validation Recall@k and restore the best weights.

    `val` maps user row -> set of held-out item rows, or is a pair (that dict,
    scipy CSR users x items to exclude); by default the edges of `g` are the
    training items excluded from the ranking. Without `val` all epochs run
    (up to cfg.max_minutes).
    """
    gen = seed_everything(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    batches = EdgeBatchSampler(g, cfg.fanouts, cfg.batch_size, cfg.negatives, gen)
    val, exclude = val if isinstance(val, tuple) else (val, None)
    if val and exclude is None:
        exclude = graph_to_csr(g)
    writer, key = _tensorboard(log_dir), f"recall@{cfg.k}"
    best, best_state, best_metrics, history, bad = -1.0, None, {}, [], 0
    start = time.time()
    for epoch in range(1, cfg.epochs + 1):
        if cfg.max_minutes and history:
            per_epoch = (time.time() - start) / len(history)
            if time.time() - start + per_epoch > cfg.max_minutes * 60:
                break
        model.train()
        total, bar = 0.0, tqdm(batches, desc=f"epoch {epoch}", disable=not progress, leave=False)
        for step, (u_pos, i_pos, neg_pos, blocks) in enumerate(bar, 1):
            emb = model(blocks, item_feats)
            loss = softmax_loss(emb["user"], emb["item"], u_pos, i_pos, neg_pos, cfg.temperature)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
            bar.set_postfix(loss=f"{total / step:.4f}")
        row = {"epoch": epoch, "loss": total / max(len(batches), 1), "seconds": time.time() - start}
        if val:
            row.update(validate(model, g, item_feats, val, exclude, cfg.k))
        history.append(row)
        if writer is not None:
            for name, value in row.items():
                writer.add_scalar(name, value, epoch)
        if progress:
            tqdm.write(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        score = row.get(key, epoch)  # without validation the latest epoch is "best"
        if score > best:
            best, best_state, best_metrics, bad = score, copy.deepcopy(model.state_dict()), row, 0
        else:
            bad += 1
            if val and bad >= cfg.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    if writer is not None:
        writer.close()
    return {"metrics": best_metrics, "history": history, "epochs": len(history),
            "seconds": time.time() - start}
