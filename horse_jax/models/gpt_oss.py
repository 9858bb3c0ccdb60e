"""gpt-oss (`model_type: gpt_oss`, e.g. openai/gpt-oss-20b): routed mixture-of-experts decoder.

What differs from Llama (as transformers' `modeling_gpt_oss` computes it):
  * attention: q/k/v/o biases; a learned logit per head (`sinks`) joins every softmax denominator
    (it takes probability mass but contributes no value); layers alternate sliding-window and full
    attention (`layer_types`); YaRN rope (cos/sin also scaled by YaRN's attention factor).
  * MLP: a router (linear with bias) picks the top-k experts per token and weights them by a softmax
    over the k chosen logits. Each expert is `down(act(gate_up(x)))` with biases, where gate_up is
    one fused projection whose columns interleave gate (even) and up (odd), and
    act = (clip(up, -limit, limit) + 1) * g * sigmoid(alpha * g) with g = min(gate, limit).
  * RMSNorm applies its weight in float32 (before casting back), unlike Llama.

Param tree (HF names; kernels [in, out]; the experts keep transformers' [E, in, out] layout):
  model.embed_tokens.embedding [V, D]
  model.layers.{i}.input_layernorm.scale, post_attention_layernorm.scale [D]
  model.layers.{i}.self_attn.{q,k,v,o}_proj.{kernel, bias}, self_attn.sinks [H]
  model.layers.{i}.mlp.router.{kernel [D, E], bias [E]}
  model.layers.{i}.mlp.experts.gate_up_proj [E, D, 2F], gate_up_proj_bias [E, 2F],
      down_proj [E, F, D], down_proj_bias [E, D]
  model.norm.scale, lm_head.kernel [D, V] (absent when tied)

The public checkpoints store the two expert matrices in MXFP4 (`*_blocks` / `*_scales`); loading
dequantizes them (`mxfp4.py`) and export writes plain tensors in the requested dtype (the written
config.json drops `quantization_config` accordingly).

The experts run densely: every token goes through every expert and the outputs are combined with
the routing weights, which are zero outside the top-k. That is E / k times the FLOPs of a sparse
dispatch but has static shapes, no gather, and splits over the `model` mesh axis by expert (each
device runs its own experts; the combine is one all-reduce), which is what editing workloads (short
batches) need.

Linear modules that hooks and editors can address: self_attn.{q,k,v,o}_proj, mlp.router, lm_head.
The MLP is not one linear, so editors default to the attention output projection `self_attn.o_proj`
(the HoReN reference wraps `model.layers.20.self_attn.o_proj` on gpt-oss-20b).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from horse_jax.errors import UserError
from horse_jax.models import config as config_lib
from horse_jax.models import hf_map, layers, registry, sharding
from horse_jax.models.config import ModelConfig
from horse_jax.models.hooks import Tap

EMBEDDING = "model.embed_tokens.embedding"  # token embedding [V, D], also the tied head
LAYER_PREFIX = "model.layers"
SLIDING, FULL = "sliding_attention", "full_attention"


@dataclasses.dataclass(frozen=True)
class GptOssConfig(ModelConfig):
  """ModelConfig plus the gpt-oss fields (hashable; part of every jit cache key).

  `sliding_window` of the base class stays None: the generic code would apply it to every layer,
  while gpt-oss windows only the layers `layer_types` marks as sliding (`window`).
  """

  num_experts: int = 1
  experts_per_token: int = 1
  swiglu_alpha: float = 1.702
  swiglu_limit: float = 7.0
  window: int | None = None
  layer_types: tuple[str, ...] = ()


# Defaults of transformers' GptOssConfig for fields a config.json may omit.
_DEFAULT_YARN = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                 "truncate": False, "original_max_position_embeddings": 4096}
_DEFAULT_THETA = 150000.0


def _rope(hf: dict[str, Any], source: str) -> tuple[float, tuple | None]:
  """(rope_theta, frozen scaling) from either config form; YaRN (the gpt-oss default) included."""
  params = hf.get("rope_parameters")
  if params:  # transformers 5
    params = dict(params)
    theta = float(params.pop("rope_theta", hf.get("rope_theta", _DEFAULT_THETA)))
    scaling = params
  else:  # transformers 4
    theta = float(hf.get("rope_theta", _DEFAULT_THETA))
    scaling = hf.get("rope_scaling")
    if scaling is None:
      scaling = _DEFAULT_YARN
  scaling = dict(scaling)
  scaling["rope_type"] = scaling.pop("type", None) or scaling.get("rope_type", "default")
  if scaling["rope_type"] == "default":
    return theta, None
  if scaling["rope_type"] not in ("yarn", "linear", "llama3"):
    raise UserError(f"{source}: unsupported rope scaling type {scaling['rope_type']!r} "
                    "(supported for gpt_oss: default, yarn, linear, llama3)")
  if scaling["rope_type"] == "yarn" and "original_max_position_embeddings" not in scaling:
    raise UserError(f"{source}: yarn rope scaling needs original_max_position_embeddings")
  return theta, tuple(sorted(scaling.items()))  # hashable; the values are scalars


def parse_config(hf: dict[str, Any], source: str) -> GptOssConfig:
  """The gpt-oss fields of a config.json (transformers' defaults where a field is omitted)."""
  # head_dim: transformers' class default 64 when omitted, hidden / heads when null.
  fields = config_lib.decoder_fields(hf, source, head_dim=64 if "head_dim" not in hf else None,
                                     max_positions=131072, norm_eps=1e-5)
  num_layers = fields["num_layers"]
  kinds = hf.get("layer_types") or [SLIDING if (i + 1) % 2 else FULL for i in range(num_layers)]
  kinds = tuple(str(k) for k in kinds)
  if len(kinds) != num_layers or set(kinds) - {SLIDING, FULL}:
    raise UserError(f"{source}: layer_types must list {num_layers} entries of "
                    f"{SLIDING!r} / {FULL!r}")
  window = hf.get("sliding_window", 128)
  if SLIDING in kinds and not window:
    raise UserError(f"{source}: layer_types has sliding layers but sliding_window is not set")
  experts = int(hf.get("num_local_experts", hf.get("num_experts", 128)))
  top_k = int(hf.get("num_experts_per_tok", 4))
  if not 1 <= top_k <= experts:
    raise UserError(f"{source}: num_experts_per_tok {top_k} must lie in [1, {experts}]")
  theta, scaling = _rope(hf, source)
  return GptOssConfig(
      **fields,  # hidden_act is read but unused: the experts' activation is fixed
      rope_theta=theta,
      rope_scaling=scaling,
      attention_bias=bool(hf.get("attention_bias", True)),
      num_experts=experts,
      experts_per_token=top_k,
      swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)),
      swiglu_limit=float(hf.get("swiglu_limit", 7.0)),
      window=int(window) if window and SLIDING in kinds else None,
      layer_types=kinds,
  )


def config_to_hf(cfg: GptOssConfig) -> dict[str, Any]:
  """The gpt-oss fields of a config.json for a config built in code (transformers-4 form)."""
  return dict(
      config_lib.decoder_to_hf(cfg),
      attention_bias=cfg.attention_bias, num_local_experts=cfg.num_experts,
      num_experts_per_tok=cfg.experts_per_token, swiglu_alpha=cfg.swiglu_alpha,
      swiglu_limit=cfg.swiglu_limit, sliding_window=cfg.window, layer_types=list(cfg.layer_types))


# Forward pass.


def rms_norm(params, x_BxTxD: jax.Array, eps: float) -> jax.Array:
  """gpt-oss RMSNorm: statistics and the weight in float32, then back to the input dtype."""
  x32 = x_BxTxD.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  scale = jnp.expand_dims(params["scale"].astype(jnp.float32), range(x_BxTxD.ndim - 1))
  return (scale * x32).astype(x_BxTxD.dtype)


embed = layers.token_embedding(EMBEDDING)


def _layer_bias(cfg: GptOssConfig, index: int, bias_Bx1xTxS, cache) -> jax.Array:
  """The generic causal/padding bias, plus the sliding window on sliding layers.

  Query slots are `start + arange(T)` and key slots `arange(S)`, where start is the cache write
  index (0 without a cache), exactly the slots the generic bias was built from.
  """
  if cfg.layer_types[index] != SLIDING:
    return bias_Bx1xTxS
  t, s = bias_Bx1xTxS.shape[2], bias_Bx1xTxS.shape[3]
  start = 0 if cache is None else cache[2]
  q = start + jnp.arange(t)
  k = jnp.arange(s)
  inside = k[None, :] > q[:, None] - cfg.window
  return bias_Bx1xTxS + jnp.where(inside, 0.0, layers.NEG_INF).astype(jnp.float32)[None, None]


def sink_attention(q_BxTxHxD, k_BxSxGxD, v_BxSxGxD, bias_Bx1xTxS, sinks_H) -> jax.Array:
  """Grouped-query attention whose softmax denominator also holds one learned logit per head.

  probs = exp(s) / (sum_S exp(s) + exp(sink)), in float32. Returns [B, T, H, D].
  """
  b, t, h, d = q_BxTxHxD.shape
  g = k_BxSxGxD.shape[2]
  rep = h // g
  q = q_BxTxHxD.reshape(b, t, g, rep, d)
  scores = jnp.einsum("btgrd,bsgd->bgrts", q, k_BxSxGxD).astype(jnp.float32) / math.sqrt(d)
  scores = scores + bias_Bx1xTxS[:, :, None, :, :]
  sink = sinks_H.astype(jnp.float32).reshape(1, g, rep, 1, 1)
  top = jnp.maximum(jnp.max(scores, axis=-1, keepdims=True), sink)
  e = jnp.exp(scores - top)
  probs = e / (jnp.sum(e, axis=-1, keepdims=True) + jnp.exp(sink - top))
  out = jnp.einsum("bgrts,bsgd->btgrd", probs.astype(v_BxSxGxD.dtype), v_BxSxGxD)
  return out.reshape(b, t, h, d)


def attention(p, cfg: GptOssConfig, x_BxTxD, positions_BxT, bias, tap: Tap, name: str, cache):
  """Self-attention with sinks; `cache` is None or (k [B,S,G,Dh], v, write_index)."""
  b, t, _ = x_BxTxD.shape
  heads, groups, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  q = tap.linear(f"{name}.q_proj", p["q_proj"], x_BxTxD).reshape(b, t, heads, dh)
  k = tap.linear(f"{name}.k_proj", p["k_proj"], x_BxTxD).reshape(b, t, groups, dh)
  v = tap.linear(f"{name}.v_proj", p["v_proj"], x_BxTxD).reshape(b, t, groups, dh)
  cos, sin = layers.rope_angles(cfg, positions_BxT, cfg.head_dim)
  q, k = layers.apply_rope_half(q, cos, sin), layers.apply_rope_half(k, cos, sin)
  k, v, new_cache = layers.update_cache(cache, k, v)
  out = sink_attention(q, k, v, bias, p["sinks"]).reshape(b, t, cfg.num_heads * cfg.head_dim)
  return tap.linear(f"{name}.o_proj", p["o_proj"], out), new_cache


def routing_weights(router_logits_BxTxE: jax.Array, k: int) -> jax.Array:
  """Dense combine weights [B, T, E]: softmax over the top-k logits, zero for the other experts."""
  top, index = jax.lax.top_k(router_logits_BxTxE, k)
  weights = jax.nn.softmax(top, axis=-1)
  one_hot = jax.nn.one_hot(index, router_logits_BxTxE.shape[-1], dtype=weights.dtype)
  return jnp.einsum("btk,btke->bte", weights, one_hot)


def expert_activation(gate_up: jax.Array, alpha: float, limit: float) -> jax.Array:
  """Clamped gated activation of the fused projection (gate = even columns, up = odd ones)."""
  gate, up = gate_up[..., 0::2], gate_up[..., 1::2]
  gate = jnp.minimum(gate, limit)
  up = jnp.clip(up, -limit, limit)
  return (up + 1) * (gate * jax.nn.sigmoid(gate * alpha))


def _per_expert(x_ExNxI: jax.Array, w_ExIxO: jax.Array) -> jax.Array:
  """[E, N, I] @ [E, I, O] -> [E, N, O] as a matmul batched over the leading expert axis.

  Written as a batched dot_general (not an einsum over "nd,edf") so that XLA uses the weights in
  their stored layout: the einsum form made it materialize a transposed copy of every expert
  matrix (gpt-oss-20b: ~2 GB per layer forward, twice that with the backward pass).
  """
  return jax.lax.dot_general(x_ExNxI, w_ExIxO, (((2,), (1,)), ((0,), (0,))))


def moe(p, cfg: GptOssConfig, x_BxTxD, tap: Tap, name: str) -> jax.Array:
  """Top-k routed experts, run densely (see the module docstring) and combined by routing weight."""
  b, t, d = x_BxTxD.shape
  e = cfg.num_experts
  router = tap.linear(f"{name}.router", p["router"], x_BxTxD)
  combine_NxE = routing_weights(router, cfg.experts_per_token).reshape(b * t, e)
  ex = p["experts"]
  dt = x_BxTxD.dtype
  x_ExNxD = jnp.broadcast_to(x_BxTxD.reshape(1, b * t, d), (e, b * t, d))
  gate_up = (_per_expert(x_ExNxD, ex["gate_up_proj"].astype(dt)) +
             ex["gate_up_proj_bias"].astype(dt)[:, None, :])
  hidden = expert_activation(gate_up, cfg.swiglu_alpha, cfg.swiglu_limit)
  out = (_per_expert(hidden, ex["down_proj"].astype(dt)) +
         ex["down_proj_bias"].astype(dt)[:, None, :])
  return jnp.einsum("end,ne->nd", out, combine_NxE.astype(dt)).reshape(b, t, d)


def block(p, cfg: GptOssConfig, h_BxTxD, positions_BxT, bias, tap: Tap, index: int, cache=None):
  """One decoder layer. Returns (h, new_cache)."""
  name = f"{LAYER_PREFIX}.{index}"
  x = rms_norm(p["input_layernorm"], h_BxTxD, cfg.norm_eps)
  attn, new_cache = attention(p["self_attn"], cfg, x, positions_BxT,
                              _layer_bias(cfg, index, bias, cache), tap, f"{name}.self_attn", cache)
  h_BxTxD = h_BxTxD + attn
  x = rms_norm(p["post_attention_layernorm"], h_BxTxD, cfg.norm_eps)
  return h_BxTxD + moe(p["mlp"], cfg, x, tap, f"{name}.mlp"), new_cache


head = layers.norm_and_unembed("model.norm", rms_norm, EMBEDDING)


# HF name table.


def _e(c):
  return (c.num_experts,)


def _h(c):
  return (c.num_heads,)


def _bias(c):
  return c.attention_bias


GLOBAL_RULES: tuple[hf_map.Rule, ...] = (
    hf_map.embedding("model.embed_tokens"),
    *hf_map.norm("model.norm"),
    *hf_map.linear("lm_head", hf_map.d, hf_map.v, present=hf_map.untied),
)
# Expert tensors are COPY in transformers' [E, in, out] layout; a checkpoint may instead hold the
# two matrices as MXFP4 `<name>_blocks` / `<name>_scales` pairs, which loading dequantizes.
LAYER_RULES: tuple[hf_map.Rule, ...] = (
    *hf_map.norm("input_layernorm"),
    *hf_map.norm("post_attention_layernorm"),
    *hf_map.linear("self_attn.q_proj", hf_map.d, hf_map.q, _bias),
    *hf_map.linear("self_attn.k_proj", hf_map.d, hf_map.kv, _bias),
    *hf_map.linear("self_attn.v_proj", hf_map.d, hf_map.kv, _bias),
    *hf_map.linear("self_attn.o_proj", hf_map.q, hf_map.d, _bias),
    ("self_attn.sinks", "self_attn.sinks", hf_map.COPY, _h, hf_map.always),
    *hf_map.linear("mlp.router", hf_map.d, _e, hf_map.always),
    ("mlp.experts.gate_up_proj", "mlp.experts.gate_up_proj", hf_map.COPY,
     lambda c: (c.num_experts, c.hidden_size, 2 * c.intermediate_size), hf_map.always),
    ("mlp.experts.gate_up_proj_bias", "mlp.experts.gate_up_proj_bias", hf_map.COPY,
     lambda c: (c.num_experts, 2 * c.intermediate_size), hf_map.always),
    ("mlp.experts.down_proj", "mlp.experts.down_proj", hf_map.COPY,
     lambda c: (c.num_experts, c.intermediate_size, c.hidden_size), hf_map.always),
    ("mlp.experts.down_proj_bias", "mlp.experts.down_proj_bias", hf_map.COPY,
     lambda c: (c.num_experts, c.hidden_size), hf_map.always),
)

# Megatron attention (q/k/v by column, o by row) and experts split over `model` by expert.
SHARDING_RULES: tuple[tuple[str, P], ...] = (
    (r"\.mlp\.experts\.(gate_up_proj|down_proj)(_bias)?$", P(sharding.MODEL)),
    *sharding.megatron_rules(EMBEDDING, column=("self_attn.q_proj", "self_attn.k_proj",
                                                "self_attn.v_proj"), row=("self_attn.o_proj",)),
)

ARCH = registry.register(registry.Architecture(
    name="gpt_oss", model_types=("gpt_oss",), hf_classes={"gpt_oss": "GptOssForCausalLM"},
    edit_module="self_attn.o_proj", codebook_module="self_attn.o_proj",
    # o_proj is followed by the layer's MoE, which must see the change: no fast path.
    residual_writers=(),
    linear_modules=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.router"),
    parse_config=parse_config, config_to_hf=config_to_hf, embed=embed, block=block, head=head,
    layer_prefix=LAYER_PREFIX, global_rules=GLOBAL_RULES, layer_rules=LAYER_RULES,
    sharding_rules=SHARDING_RULES))
