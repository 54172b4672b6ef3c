"""A lean forward pass of the Llama family's body for scoring: the same computation as transformers'
``LlamaModel`` (and Qwen 2, Mistral without a sliding window), in fewer, larger kernels.

Scoring unpadded windows needs none of the general machinery (masks, caches, hooks), and on a CPU the small
element-wise kernels around the matmuls cost a good part of the time.  Here, per layer:

* RMSNorm is one fused ``torch.nn.functional.rms_norm``;
* the rotary embedding is applied in place, half by half (``addcmul``), with transformers' own cos/sin;
* attention is one SDPA call, causal, with grouped key/value heads (no copies of them);
* the output and down projections add into the residual stream inside the matmul (``addmm``);
* SiLU and the gate product run in place.

The results equal transformers' to float32 rounding (tests/test_bpb.py checks them). :func:`lean_body` says
whether a model qualifies; anything else (another architecture, a sliding window, a wrapped or replaced
module, a non-SiLU activation) runs transformers' own forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_BODIES = {"LlamaModel": "llama", "Qwen2Model": "qwen2", "MistralModel": "mistral"}


def _plain(module) -> bool:
    return type(module) is torch.nn.Linear


def lean_body(model):
    """A callable ``ids (batch, length) -> last hidden states (batch, length, hidden)`` equal to the model's
    body, or None when the model is not one this module reproduces exactly."""
    body = getattr(model, "model", None)
    if body is None or _BODIES.get(type(body).__name__) != getattr(model.config, "model_type", None):
        return None
    if not type(body).__module__.startswith("transformers.models."):
        return None
    if torch.__version__ < "2.5":  # SDPA's enable_gqa
        return None
    config = model.config
    if getattr(config, "hidden_act", None) != "silu" or (getattr(config, "pretraining_tp", 1) or 1) != 1:
        return None
    if any(kind != "full_attention" for kind in (getattr(config, "layer_types", None) or [])):
        return None
    if config.model_type == "mistral" and getattr(config, "sliding_window", None) is not None:
        return None
    if config.model_type == "qwen2" and getattr(config, "use_sliding_window", False):
        return None
    if type(body.embed_tokens) is not torch.nn.Embedding or not hasattr(body, "rotary_emb"):
        return None
    for layer in body.layers:
        attn, mlp = layer.self_attn, layer.mlp
        linears = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        if not all(_plain(m) for m in linears) or type(layer).__name__ not in ("LlamaDecoderLayer",
                                                                                "Qwen2DecoderLayer",
                                                                                "MistralDecoderLayer"):
            return None
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if not type(norm).__name__.endswith("RMSNorm") or not hasattr(norm, "variance_epsilon"):
                return None
    if not type(body.norm).__name__.endswith("RMSNorm"):
        return None
    return _LeanLlama(body, config)


class _LeanLlama:
    def __init__(self, body, config):
        self.body = body
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.gqa = self.kv_heads != self.heads

    def _norm(self, x: torch.Tensor, norm) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``x * cos + rotate_half(x) * sin`` for x (batch, length, heads, head_dim)."""
        half = x.shape[-1] // 2
        out = torch.empty_like(x)
        x1, x2 = x[..., :half], x[..., half:]
        torch.mul(x1, cos[..., :half], out=out[..., :half]).addcmul_(x2, sin[..., :half], value=-1)
        torch.mul(x2, cos[..., half:], out=out[..., half:]).addcmul_(x1, sin[..., half:])
        return out

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        body = self.body
        batch, length = ids.shape
        hidden = body.embed_tokens(ids)
        positions = torch.arange(length)[None].expand(batch, length)
        cos, sin = body.rotary_emb(hidden, positions)  # (batch, length, head_dim)
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
        h = hidden.reshape(batch * length, -1)  # the residual stream, updated in place
        for layer in body.layers:
            attn, mlp = layer.self_attn, layer.mlp
            x = self._norm(h, layer.input_layernorm)
            q = self._rotate(attn.q_proj(x).view(batch, length, self.heads, self.head_dim), cos, sin)
            k = self._rotate(attn.k_proj(x).view(batch, length, self.kv_heads, self.head_dim), cos, sin)
            v = attn.v_proj(x).view(batch, length, self.kv_heads, self.head_dim)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=True, scale=attn.scaling, enable_gqa=self.gqa)
            out = out.transpose(1, 2).reshape(batch * length, -1)
            _add_linear(h, out, attn.o_proj)
            x = self._norm(h, layer.post_attention_layernorm)
            gate = F.silu(mlp.gate_proj(x), inplace=True).mul_(mlp.up_proj(x))
            _add_linear(h, gate, mlp.down_proj)
        return self._norm(h, body.norm).view(batch, length, -1)


def _add_linear(h: torch.Tensor, x: torch.Tensor, linear: torch.nn.Linear) -> None:
    """``h += linear(x)``, the add inside the matmul."""
    h.addmm_(x, linear.weight.t())
    if linear.bias is not None:
        h.add_(linear.bias)
