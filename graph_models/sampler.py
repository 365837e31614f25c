"""Minibatches for link prediction: positive edges, shared negatives, sampled blocks.

Neighbour sampling is done here with a torch generator rather than DGL's
sampler, whose C++ RNG gave different neighbourhoods for the same dgl.seed:
training must be reproducible from cfg.seed.
"""
import random

import dgl
import numpy as np
import torch

from .graph import ITEM, IU, UI, USER


class NeighbourSampler:
    """Blocks with about `fanout` random in-edges per seed node (all edges if fanout <= 0).

    Each edge is kept with probability fanout / in-degree of its destination.
    Drawing once per edge of the whole graph is vectorised and, because the
    outer layer's seeds cover most of the graph anyway, cheaper than gathering
    and sorting the seeds' in-edges.
    """

    def __init__(self, g, fanouts):
        self.g, self.fanouts = g, [int(f or 0) for f in fanouts]
        self.dst = {et: g.edges(etype=et)[1] for et in (UI, IU)}
        deg = {et: g.in_degrees(etype=et).clamp(min=1).to(torch.float32) for et in (UI, IU)}
        self.inv_deg = {et: 1.0 / deg[et][self.dst[et]] for et in (UI, IU)}

    def sample_block(self, seeds, fanout, exclude, gen):
        """One block whose destination nodes are `seeds`; `exclude` are 'ui'/'iu' edge ids."""
        chosen = {}
        for et in (UI, IU):
            is_seed = torch.zeros(self.g.num_nodes(et[2]), dtype=torch.bool)
            is_seed[seeds[et[2]]] = True
            keep = is_seed[self.dst[et]]
            if fanout > 0:
                keep &= torch.rand(len(keep), generator=gen) < fanout * self.inv_deg[et]
            if exclude is not None:
                keep[exclude] = False
            chosen[et] = keep.nonzero().squeeze(1)
        frontier = dgl.edge_subgraph(self.g, chosen, relabel_nodes=False, store_ids=True)
        return dgl.to_block(frontier, seeds)

    def sample_blocks(self, seeds, exclude=None, gen=None):
        """Blocks for a multi-layer model, input layer first."""
        blocks = []
        for fanout in reversed(self.fanouts):
            block = self.sample_block(seeds, fanout, exclude, gen)
            seeds = {t: block.srcnodes[t].data[dgl.NID] for t in (USER, ITEM)}
            blocks.insert(0, block)
        return blocks


class EdgeBatchSampler:
    """Yields (user_pos, item_pos, blocks) for shuffled batches of 'ui' edges.

    The batch's own edges are removed from the sampled neighbourhoods in both
    directions, so a user is never embedded from the very item it must predict:
    training then looks like serving, where the future item is not yet an edge.
    """

    def __init__(self, g, fanouts, batch_size, negatives, generator):
        self.g, self.gen = g, generator
        self.neighbours = NeighbourSampler(g, fanouts)
        self.batch_size, self.negatives = int(batch_size), int(negatives)
        self.num_edges = g.num_edges(UI)

    def __len__(self):
        return (self.num_edges + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        perm = torch.randperm(self.num_edges, generator=self.gen)
        for s in range(0, self.num_edges, self.batch_size):
            yield self.sample(perm[s:s + self.batch_size])

    def sample(self, eids):
        """Blocks for one batch of edge ids, with local indices of its users and items.

        The seed items are the batch's positives (popularity-distributed, the
        "in-batch" negatives of every other edge) plus `negatives` uniform items.
        """
        u, i = self.g.find_edges(eids, etype=UI)
        uniform = torch.randint(self.g.num_nodes(ITEM), (self.negatives,), generator=self.gen)
        users, u_pos = torch.unique(u, return_inverse=True)
        items, inv = torch.unique(torch.cat([i, uniform]), return_inverse=True)
        # Reverse edges share ids with their 'ui' edge (see build_graph), so one id
        # list removes the interaction in both directions.
        blocks = self.neighbours.sample_blocks({USER: users, ITEM: items}, eids, self.gen)
        return u_pos, inv[: len(eids)], blocks


def seed_everything(seed):
    """Seed python, numpy, torch and DGL; returns a torch generator for batches and sampling."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    dgl.seed(seed)
    return torch.Generator().manual_seed(seed)
