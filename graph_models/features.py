"""Content features of items: stable hashing and row selection of feature dicts."""
import zlib

import torch


def hash_bucket(text, buckets):
    """Stable bucket id of a string in [0, buckets); crc32, identical across processes."""
    return zlib.crc32(str(text).encode("utf-8")) % int(buckets)


def select_features(item_feats, ids):
    """Rows `ids` of an item feature dict (category, price, tokens); None stays None."""
    if not item_feats:
        return {}
    out = {}
    for key in ("category", "price"):
        if item_feats.get(key) is not None:
            out[key] = torch.as_tensor(item_feats[key])[ids]
    if item_feats.get("tokens") is not None:
        toks = item_feats["tokens"]
        out["tokens"] = [toks[j] for j in ids.tolist()]
    return out


def token_bag(tokens, device=None):
    """Flatten a list of token-id lists into (flat ids, offsets) for nn.EmbeddingBag."""
    lengths = [len(t) for t in tokens]
    flat = [int(x) for t in tokens for x in t]
    offsets = torch.zeros(len(tokens), dtype=torch.int64)
    if len(lengths) > 1:
        offsets[1:] = torch.cumsum(torch.tensor(lengths[:-1], dtype=torch.int64), 0)
    return torch.tensor(flat, dtype=torch.int64, device=device), offsets.to(device)
