"""Run a causal LM over a tree of token sequences that share prefixes.

Every node of the tree is one token whose context is the path from the root to
it.  All nodes added in one call are computed in a single forward pass: each
attends to its own ancestors only (a custom 4-D mask), at position = depth, and
the keys and values of every node stay in one cache ("bag") so later calls
reuse them.  The model's sliding-window layers get a mask that also drops
ancestors further back than the window, so every node sees exactly the context
a plain left-to-right forward over its path would give it.  With SDPA, a large pass runs its attention a block
of queries at a time against the keys up to the block's last node (a node's ancestors all come before it), so
it costs what a causal pass over as many tokens costs, not twice that.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import TokenbridgeError


TREE_ATTENTION = "tokenbridge_tree"
QUERY_BLOCK = 256  # queries per SDPA call in a large forward pass


def _tree_sdpa(module, query, key, value, attention_mask, **kwargs):
    """Transformers' SDPA attention, a block of queries at a time, each block against the keys up to its last
    node only.  Nodes come parents first, so every key a node may see sits in a slot before its own: the keys
    after a block are masked for all of it, and skipping them (about half the work of a large pass, as a causal
    kernel skips the upper triangle) changes nothing."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    queries, keys = query.shape[2], key.shape[2]
    if attention_mask is None or queries <= QUERY_BLOCK:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    offset = keys - queries  # slots cached before this pass
    outs = []
    for start in range(0, queries, QUERY_BLOCK):
        end = min(queries, start + QUERY_BLOCK)
        out, _ = sdpa_attention_forward(module, query[:, :, start:end], key[:, :, :offset + end],
                                        value[:, :, :offset + end], attention_mask[:, :, start:end, :offset + end],
                                        **kwargs)
        outs.append(out)
    return torch.cat(outs, dim=1), None


def _register_tree_attention() -> None:
    from transformers import AttentionInterface

    if TREE_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(TREE_ATTENTION, _tree_sdpa)


@dataclass(eq=False)
class TreeNode:
    token: int
    depth: int  # position id: 0 for the root
    slots: np.ndarray  # cache slots of the root..self path, in order
    parent: TreeNode | None = None


class TokenTree:
    """A KV cache shared by all paths of a token tree, for one model."""

    def __init__(self, model):
        self.model = model.eval()
        config = model.config
        self.config = config
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        self.context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        layer_types = getattr(config, "layer_types", None) or []
        window = getattr(config, "sliding_window", None)
        if not getattr(config, "use_sliding_window", True):
            window = None
        # hybrid models (Gemma 3) take one mask per layer type; others one mask for every layer,
        # windowed when the model has a window and no layer types (Mistral)
        self.sliding = window if "sliding_attention" in layer_types else None
        self.sliding_all = window if (window and not layer_types) else None
        self.cache = None
        self.size = 0  # slots used in the cache
        self.epoch = 0
        self.calls = 0  # forward passes run (for measurements)
        self.tokens = 0  # tokens run through the model

    def reset(self) -> None:
        self.cache = None
        self.size = 0
        self.epoch += 1  # nodes of earlier epochs are no longer in the cache

    def _new_cache(self):
        from transformers import DynamicCache

        return DynamicCache()  # plain full layers: slots are never evicted

    def _mask(self, queries: list[TreeNode], window: int | None) -> torch.Tensor:
        """Each query sees its ancestors and itself: a boolean mask for SDPA (a quarter of a float mask's
        memory), an additive one for eager attention."""
        total = self.size + len(queries)
        allowed = np.zeros((len(queries), total), dtype=bool)
        for row, node in enumerate(queries):
            slots = node.slots
            if window is not None and len(slots) > window:
                slots = slots[-window:]  # depth(q) - depth(k) < window
            allowed[row, slots] = True
        mask = torch.from_numpy(allowed)
        if self.config._attn_implementation != "sdpa":
            mask = torch.zeros(mask.shape, dtype=self.dtype).masked_fill_(~mask, torch.finfo(self.dtype).min)
        return mask[None, None].to(self.device)

    def extend(self, items: list[tuple[TreeNode | int | None, int]]) -> tuple[list[TreeNode], torch.Tensor]:
        """Add children ``(parent, token)``; return the nodes and their last hidden states.

        ``parent`` is a node from an earlier call, the index of an earlier item of this
        call, or None for a new root.
        """
        nodes: list[TreeNode] = []
        for offset, (parent, token) in enumerate(items):
            slot = self.size + offset
            if isinstance(parent, int):
                parent = nodes[parent]
            if parent is None:
                node = TreeNode(int(token), 0, np.array([slot], dtype=np.int64))
            else:
                node = TreeNode(int(token), parent.depth + 1, np.append(parent.slots, slot), parent)
            if self.context is not None and node.depth >= self.context:
                raise TokenbridgeError(
                    f"the context reached {node.depth + 1} tokens, more than the model's {self.context}; "
                    "use a smaller window")
            nodes.append(node)
        if not nodes:
            return nodes, torch.empty(0)
        if self.cache is None:
            self.cache = self._new_cache()
        ids = torch.tensor([[n.token for n in nodes]], device=self.device)
        positions = torch.tensor([[n.depth for n in nodes]], device=self.device)
        full = self._mask(nodes, self.sliding_all)
        if self.sliding is not None:
            mask = {"full_attention": full, "sliding_attention": self._mask(nodes, self.sliding)}
        else:
            mask = full
        cache_position = torch.arange(self.size, self.size + len(nodes), device=self.device)
        blocks = self.config._attn_implementation == "sdpa"
        if blocks:
            _register_tree_attention()
            self.config._attn_implementation = TREE_ATTENTION
        try:
            with torch.inference_mode():
                body = self.model.model if hasattr(self.model, "model") else self.model.transformer
                out = body(input_ids=ids, position_ids=positions, attention_mask=mask, cache=self.cache,
                           use_cache=True, cache_position=cache_position)
        finally:
            if blocks:
                self.config._attn_implementation = "sdpa"
        self.size += len(nodes)
        self.calls += 1
        self.tokens += len(nodes)
        return nodes, out.last_hidden_state[0]

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Output logits (float64) of hidden states, with the model's final soft-capping if it has one."""
        return self.head_logits(hidden).double()

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """:meth:`head` in the model's own dtype (float64 holds every value exactly)."""
        with torch.inference_mode():
            logits = self.model.get_output_embeddings()(hidden)
            cap = getattr(self.config, "final_logit_softcapping", None)
            if cap:
                logits = torch.tanh(logits / cap) * cap
            return logits
