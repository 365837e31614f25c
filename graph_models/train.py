"""Link-prediction training of InterestSAGE: sampled softmax over in-batch + uniform negatives."""
import copy
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .evaluation import embedding_scorer, evaluate
from .graph import graph_to_csr
from .sampler import EdgeBatchSampler, seed_everything


def softmax_loss(user_emb, item_emb, u_pos, i_pos, temperature):
    """InfoNCE of each (user, item) edge against every seed item of the batch.

    Scores are cosines / temperature, the same ranking serving uses. Items the
    same user also interacted with in this batch are masked out, so a true
    positive is never pushed down as a negative.
    """
    logits = user_emb[u_pos] @ item_emb.T / temperature
    pos = torch.zeros(user_emb.shape[0], item_emb.shape[0], dtype=torch.bool)
    pos[u_pos, i_pos] = True
    mask = pos[u_pos]
    mask[torch.arange(len(u_pos)), i_pos] = False
    return F.cross_entropy(logits.masked_fill(mask, float("-inf")), i_pos)


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
        if cfg.max_minutes and time.time() - start > cfg.max_minutes * 60:
            break
        model.train()
        total, step = 0.0, 0
        bar = tqdm(batches, desc=f"epoch {epoch}", disable=not progress, leave=False)
        for step, (u_pos, i_pos, blocks) in enumerate(bar, 1):
            emb = model(blocks, item_feats)
            loss = softmax_loss(emb["user"], emb["item"], u_pos, i_pos, cfg.temperature)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
            bar.set_postfix(loss=f"{total / step:.4f}")
            if cfg.max_minutes and time.time() - start > cfg.max_minutes * 60:
                break  # a slow (e.g. shared) machine must not blow the time budget
        row = {"epoch": epoch, "loss": total / max(step, 1), "seconds": time.time() - start}
        if val:
            row.update(validate(model, g, item_feats, val, exclude, cfg.k))
        history.append(row)
        if writer is not None:
            for name, value in row.items():
                writer.add_scalar(name, value, epoch)
        if progress:
            tqdm.write(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in row.items()))
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
