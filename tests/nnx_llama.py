"""A small Flax NNX Llama for the interop tests, with Hugging Face module names.

`LlamaForCausalLM.model.layers[i].mlp.down_proj` is an `nnx.Linear` (kernel [in, out]), so its
path in the NNX graph reads `model.layers.i.mlp.down_proj`, like the horse-jax name. Written from
the Llama equations (RMSNorm, rotate-half rope with positions counted from the first real token, GQA
softmax attention with causal + padding mask, SwiGLU MLP, untied head), independently of
`horse_jax.models`. `from_horse` builds one from a horse-jax `Model`'s arrays.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


class RMSNorm(nnx.Module):

  def __init__(self, d: int, eps: float):
    self.scale = nnx.Param(jnp.ones((d,), jnp.float32))
    self.eps = eps

  def __call__(self, x):
    var = jnp.mean(x * x, axis=-1, keepdims=True)
    return self.scale[...][None, None, :] * (x * jax.lax.rsqrt(var + self.eps))


def _linear(d_in, d_out, rngs):
  return nnx.Linear(d_in, d_out, use_bias=False, rngs=rngs)


def rope(x_BxTxHxD, positions_BxT, theta):
  half = x_BxTxHxD.shape[-1] // 2
  freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) * 2 / x_BxTxHxD.shape[-1]))
  ang = positions_BxT.astype(jnp.float32)[:, :, None, None] * freq[None, None, None, :]
  cos, sin = jnp.cos(ang), jnp.sin(ang)
  x1, x2 = x_BxTxHxD[..., :half], x_BxTxHxD[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class Attention(nnx.Module):

  def __init__(self, d, heads, kv_heads, head_dim, theta, rngs):
    self.heads, self.kv_heads, self.head_dim, self.theta = heads, kv_heads, head_dim, theta
    self.q_proj = _linear(d, heads * head_dim, rngs)
    self.k_proj = _linear(d, kv_heads * head_dim, rngs)
    self.v_proj = _linear(d, kv_heads * head_dim, rngs)
    self.o_proj = _linear(heads * head_dim, d, rngs)

  def __call__(self, x, positions, allowed_Bx1xTxT):
    b, t, _ = x.shape
    q = rope(self.q_proj(x).reshape(b, t, self.heads, self.head_dim), positions, self.theta)
    k = rope(self.k_proj(x).reshape(b, t, self.kv_heads, self.head_dim), positions, self.theta)
    v = self.v_proj(x).reshape(b, t, self.kv_heads, self.head_dim)
    rep = self.heads // self.kv_heads
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)  # head h uses group h // rep
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(self.head_dim)
    scores = jnp.where(allowed_Bx1xTxT, scores, -1e30)
    out = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), v)
    return self.o_proj(out.reshape(b, t, self.heads * self.head_dim))


class MLP(nnx.Module):

  def __init__(self, d, f, rngs):
    self.gate_proj = _linear(d, f, rngs)
    self.up_proj = _linear(d, f, rngs)
    self.down_proj = _linear(f, d, rngs)

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):

  def __init__(self, d, f, heads, kv_heads, head_dim, theta, eps, rngs):
    self.input_layernorm = RMSNorm(d, eps)
    self.self_attn = Attention(d, heads, kv_heads, head_dim, theta, rngs)
    self.post_attention_layernorm = RMSNorm(d, eps)
    self.mlp = MLP(d, f, rngs)

  def __call__(self, h, positions, allowed):
    h = h + self.self_attn(self.input_layernorm(h), positions, allowed)
    return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nnx.Module):

  def __init__(self, vocab, d, f, n_layers, heads, kv_heads, head_dim, theta, eps, rngs):
    self.embed_tokens = nnx.Embed(vocab, d, rngs=rngs)
    self.layers = nnx.List([DecoderLayer(d, f, heads, kv_heads, head_dim, theta, eps, rngs)
                            for _ in range(n_layers)])
    self.norm = RMSNorm(d, eps)


class LlamaForCausalLM(nnx.Module):
  """input_ids [B, T], attention_mask [B, T] (left or right padding) -> logits [B, T, V]."""

  def __init__(self, vocab=128, d=64, f=128, n_layers=4, heads=4, kv_heads=2, head_dim=16,
               theta=10000.0, eps=1e-6, *, rngs: nnx.Rngs):
    self.model = LlamaModel(vocab, d, f, n_layers, heads, kv_heads, head_dim, theta, eps, rngs)
    self.lm_head = _linear(d, vocab, rngs)

  def __call__(self, input_ids, attention_mask=None):
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    positions = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)
    t = input_ids.shape[1]
    causal = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]
    allowed = (causal[None, :, :] & (attention_mask[:, None, :] != 0))[:, None, :, :]
    h = self.model.embed_tokens(input_ids)
    for layer in self.model.layers:
      h = layer(h, positions, allowed)
    return self.lm_head(self.model.norm(h))


def from_horse(model) -> LlamaForCausalLM:
  """An NNX Llama holding exactly the arrays of a horse-jax llama `Model` (untied head, no biases).

  The NNX param paths are the horse-jax param paths with integer list indices
  (`model.layers.0.mlp.down_proj.kernel`), so every leaf is looked up by its path; the module is
  built abstractly first (no random init).
  """
  cfg = model.config
  abstract = nnx.eval_shape(lambda: LlamaForCausalLM(
      cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads,
      cfg.num_kv_heads, cfg.head_dim, cfg.rope_theta, cfg.norm_eps, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)

  def leaf(path, abstract_leaf):
    node = model.params
    for part in path:
      node = node[str(part.key)]
    assert node.shape == abstract_leaf.shape, path
    return node

  pure = jax.tree_util.tree_map_with_path(leaf, nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)
