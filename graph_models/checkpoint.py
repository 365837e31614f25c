"""Save and load InterestSAGE checkpoints as a plain dict of tensors and JSON-able values."""
import json

import torch

from .coldstart import ContentPart
from .config import ModelConfig
from .model import InterestSAGE


def save_checkpoint(path, model, cfg, meta):
    """Write state_dict, config and JSON-able `meta` (version, item_ids, metrics, ...) to `path`."""
    json.dumps(meta)  # fail now, not at load time, if meta is not plain data
    blob = {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "config": cfg.to_dict(), "meta": meta}
    if getattr(model, "content", None) is not None:  # the version's content encoder and map
        blob["content"] = model.content.to_state()
    torch.save(blob, path)


def load_checkpoint(path):
    """Return (model in eval mode, ModelConfig, meta) from a save_checkpoint file; a version trained
    with content has its `ContentPart` as `model.content`."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    cfg = ModelConfig.from_dict(blob["config"])
    state = blob["state_dict"]
    deg = state["out_scale"] ** 2
    model = InterestSAGE(state["basis"], state["s2"], deg, cfg)
    state.setdefault("bias", model.bias)  # checkpoints from before item biases
    model.ease = state.setdefault("ease", model.ease)  # its shape is the version's (or empty)
    model.load_state_dict(state)
    if "content" in blob:
        model.content = ContentPart.from_state(blob["content"])
    return model.eval(), cfg, blob["meta"]
