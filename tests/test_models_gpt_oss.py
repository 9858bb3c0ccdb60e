"""gpt-oss: parity with transformers (logits, greedy generation, routing), MXFP4 dequantization,
load -> export -> load, and HoReN edits wrapping an attention output projection."""

import functools
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

torch = pytest.importorskip("torch")

from horse_jax.editors.codebook import adapter, edit, state  # noqa: E402
from horse_jax.models import (Hooks, apply, forward, from_pretrained, generate,  # noqa: E402
                              save_pretrained)
from horse_jax.models import make_mesh, mxfp4, shard_model  # noqa: E402
from horse_jax.models.names import get_module  # noqa: E402
from test_codebook_edit import make_batch, np_query_perc50, settings  # noqa: E402

WINDOW = 3
YARN = dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
            original_max_position_embeddings=4096)
TINY = dict(vocab_size=101, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
            num_experts_per_tok=2, sliding_window=WINDOW, max_position_embeddings=131072,
            layer_types=["sliding_attention", "full_attention"], rope_theta=150000.0,
            rope_scaling=YARN, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            initializer_range=0.1)


def build_tiny(folder, seed=0):
  """A tiny random transformers GptOss (eager attention), saved to `folder`; returns it (eval).

  Every parameter gets extra noise; the fused gate/up biases get large noise so the clamp at
  `swiglu_limit` is reached.
  """
  import transformers
  torch.manual_seed(seed)
  torch.set_num_threads(1)
  config = transformers.GptOssConfig(**TINY)
  config._attn_implementation = "eager"
  model = transformers.GptOssForCausalLM(config).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      param.add_((4.0 if name.endswith("gate_up_proj_bias") else 0.1) * torch.randn_like(param))
  model.save_pretrained(str(folder))
  return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  folder = tmp_path_factory.mktemp("gpt-oss")
  return build_tiny(folder), folder


@pytest.fixture(scope="module")
def ours(tiny):
  return from_pretrained(tiny[1])


def _batch(vocab=101, b=3, t=9, seed=0):
  """Ids [B, T] with left padding on rows 0 (4 pads) and 1 (1 pad); T > the sliding window."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(3, vocab, (b, t))
  mask = np.ones((b, t), np.int64)
  mask[0, :4] = 0
  mask[1, :1] = 0
  ids[mask == 0] = 0
  return ids, mask


def _torch_logits(model, ids, mask):
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.no_grad():
    out = model(torch.tensor(ids), attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(positions))
  return out.logits.float().numpy()


def test_config_fields(ours):
  cfg = ours.config
  assert cfg.model_type == "gpt_oss" and cfg.num_experts == 4 and cfg.experts_per_token == 2
  assert cfg.window == WINDOW and cfg.sliding_window is None  # windowed per layer, not globally
  assert cfg.layer_types == ("sliding_attention", "full_attention")
  assert dict(cfg.rope_scaling)["rope_type"] == "yarn"


_apply = jax.jit(lambda model, ids, mask: apply(model, ids, attention_mask=mask))


def test_logits_match_transformers(tiny, ours):
  torch_model, _ = tiny
  ids, mask = _batch()
  full = np.ones_like(mask)
  ref = _torch_logits(torch_model, ids, full)
  got = np.asarray(_apply(ours, jnp.asarray(ids), jnp.asarray(full)))
  assert np.abs(ref).max() > 0.5
  np.testing.assert_array_less(np.abs(got - ref).max(), 1e-4)
  ref = _torch_logits(torch_model, ids, mask)
  got = np.asarray(_apply(ours, jnp.asarray(ids), jnp.asarray(mask)))
  real = mask.astype(bool)
  np.testing.assert_array_less(np.abs(got - ref)[real].max(), 1e-4)


def test_routing_and_clamp_are_exercised(tiny):
  """Tokens go to different experts, and some gate/up values pass the clamp (so both count)."""
  torch_model, _ = tiny
  chosen, clamped = [], []

  def router_hook(module, args, out):
    chosen.append(out[2].numpy())

  def experts_hook(module, args, out):
    x = args[0]
    gate_up = torch.einsum("td,edf->tef", x, module.gate_up_proj) + module.gate_up_proj_bias
    clamped.append(float((gate_up.abs() > module.limit).float().mean()))

  layer = torch_model.model.layers[1].mlp
  handles = [layer.router.register_forward_hook(router_hook),
             layer.experts.register_forward_hook(experts_hook)]
  try:
    ids, mask = _batch()
    _torch_logits(torch_model, ids, np.ones_like(mask))
  finally:
    for h in handles:
      h.remove()
  picks = chosen[0]  # [tokens, k]
  assert len({tuple(sorted(row)) for row in picks}) > 1  # tokens differ in their expert pair
  assert len(np.unique(picks)) == 4  # every expert is used by some token
  assert 0.0 < clamped[0] < 0.5


def test_greedy_generation_matches_transformers(tiny, ours):
  torch_model, _ = tiny
  ids, mask = _batch(t=6)
  new = np.asarray(generate(ours, ids, attention_mask=mask, max_new_tokens=8))
  with torch.no_grad():
    ref = torch_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask),
                               max_new_tokens=8, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[:, ids.shape[1]:].numpy()
  np.testing.assert_array_equal(new, ref)
  assert len(np.unique(ref)) > 3  # not one repeated token


# MXFP4.


def pack_mxfp4(values, exponents):
  """Test-side packer: values [..., G * 32] that are e2m1 numbers times 2 ** exponents [..., G]."""
  table = {v: i for i, v in enumerate([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])}
  scaled = values / np.repeat(np.exp2(exponents.astype(np.float64)), 32, axis=-1)
  code = np.vectorize(lambda v: table[abs(v)] | (8 if np.signbit(v) else 0))
  codes = code(scaled).astype(np.uint8)
  codes = codes.reshape(values.shape[:-1] + (-1, 32))
  blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
  return blocks, (exponents + 127).astype(np.uint8)


def _known(shape_rows, groups, seed):
  rng = np.random.RandomState(seed)
  magnitudes = np.asarray([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
  e2m1 = magnitudes[rng.randint(0, 8, shape_rows + (groups * 32,))]
  e2m1 = np.where(rng.rand(*e2m1.shape) < 0.5, -e2m1, e2m1)
  exponents = rng.randint(-20, 20, shape_rows + (groups,))
  exponents[..., 0] = -127  # the smallest scale: subnormal float32 results
  return e2m1 * np.repeat(np.exp2(exponents.astype(np.float64)), 32, axis=-1), exponents


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mxfp4_matches_transformers(dtype):
  from transformers.integrations.mxfp4 import convert_moe_packed_tensors
  values, exponents = _known((3, 5), 2, seed=1)  # [E, rows, cols]
  blocks, scales = pack_mxfp4(values, exponents)
  assert blocks.shape == (3, 5, 2, 16) and scales.shape == (3, 5, 2)
  np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[dtype]
  ours = mxfp4.dequantize_experts(blocks, scales, np_dtype)
  ref = convert_moe_packed_tensors(torch.tensor(blocks), torch.tensor(scales),
                                   dtype=getattr(torch, dtype)).float().numpy()
  assert ours.shape == ref.shape == (3, 64, 5)
  np.testing.assert_array_equal(ours.astype(np.float32), ref)
  if dtype == "float32":  # the known values, transposed to [E, in, out]
    np.testing.assert_array_equal(ours, np.swapaxes(values, 1, 2).astype(np.float32))


def test_mxfp4_checkpoint_loads_like_transformers(tiny, tmp_path):
  """A checkpoint whose expert matrices are MXFP4 pairs loads to transformers' dequantization."""
  from safetensors.numpy import load_file, save_file
  import shutil

  from transformers.integrations.mxfp4 import convert_moe_packed_tensors
  _, folder = tiny
  out = tmp_path / "mxfp4"
  shutil.copytree(folder, out)
  tensors = load_file(str(out / "model.safetensors"))
  expected = {}
  for i, name in enumerate(n for n in list(tensors) if n.endswith(("gate_up_proj", "down_proj"))):
    e, d_in, d_out = tensors[name].shape  # transformers' [E, in, out]; MXFP4 packs [E, out, in]
    values, exponents = _known((e, d_out), d_in // 32, seed=10 + i)
    blocks, scales = pack_mxfp4(values, exponents)
    del tensors[name]
    tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
    expected[name] = convert_moe_packed_tensors(torch.tensor(blocks), torch.tensor(scales),
                                                dtype=torch.float32).numpy()
  assert len(expected) == 2 * TINY["num_hidden_layers"]
  save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
  model = from_pretrained(out)
  # On a mesh every device reads and dequantizes only its own experts (split over `model`).
  sharded = from_pretrained(out, mesh=make_mesh(2, 4))
  for name, ref in expected.items():
    parent, leaf = name.rsplit(".", 1)
    np.testing.assert_array_equal(np.asarray(get_module(model.params, parent)[leaf]), ref)
    array = get_module(sharded.params, parent)[leaf]
    assert array.sharding.spec == P("model")
    np.testing.assert_array_equal(np.asarray(array), ref)
  bf16 = from_pretrained(out, dtype="bfloat16")  # dequantized straight to the requested dtype
  name = next(iter(expected))
  parent, leaf = name.rsplit(".", 1)
  got = np.asarray(get_module(bf16.params, parent)[leaf])
  assert got.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(got.astype(np.float32), convert_moe_packed_tensors(
      torch.tensor(tensors[name + "_blocks"]), torch.tensor(tensors[name + "_scales"]),
      dtype=torch.bfloat16).float().numpy())


def test_load_export_load_bit_exact(ours, tmp_path):
  save_pretrained(ours, tmp_path / "a")
  again = from_pretrained(tmp_path / "a")
  flat = lambda m: {  # noqa: E731
      jax.tree_util.keystr(k): np.asarray(v)
      for k, v in jax.tree_util.tree_leaves_with_path(m.params)}
  a, b = flat(ours), flat(again)
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  assert again.config == ours.config
  hf = json.loads((tmp_path / "a" / "config.json").read_text())
  assert hf["model_type"] == "gpt_oss" and "quantization_config" not in hf


def test_export_reloads_in_transformers(tiny, ours, tmp_path):
  import transformers
  save_pretrained(ours, tmp_path / "b")
  reloaded = transformers.GptOssForCausalLM.from_pretrained(str(tmp_path / "b")).eval()
  ids, mask = _batch()
  np.testing.assert_array_equal(_torch_logits(reloaded, ids, mask),
                                _torch_logits(tiny[0], ids, mask))


# HoReN on an attention output projection.

O_PROJ = "model.layers.0.self_attn.o_proj"  # a sliding-window layer; layer 1 runs above it
PROMPTS = [[5, 9, 17, 33, 2], [8, 8, 60, 61, 62, 63, 64], [90, 91, 92, 93]]


@jax.jit
def _forward(model, ids, mask):
  out = forward(model, ids, attention_mask=mask, hooks=Hooks(capture=(O_PROJ,)))
  return out.logits, out.captured[O_PROJ]


def _o_proj_io(model, batch):
  """Input [B, T, H*Dh] and own output [B, T, D] of the wrapped o_proj (float64), and the logits."""
  logits, x = _forward(model, jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask))
  x = np.asarray(x, np.float64)
  module = get_module(model.params, O_PROJ)
  y = x @ np.asarray(module["kernel"], np.float64) + np.asarray(module["bias"], np.float64)
  return x, y, np.asarray(logits)


def _book(model, st):
  cfg = model.config
  return state.init(st, cfg.num_heads * cfg.head_dim, cfg.hidden_size)  # o_proj: d_in = H * Dh


def test_horen_on_o_proj_adds_reuses_and_changes_only_the_edit_position(ours):
  st = settings(layer=O_PROJ, hopfield_key_match_threshold=0.5)
  batch = make_batch(PROMPTS, [[40, 41], [50, 51], [41, 42]])  # one target length: one compile
  book = _book(ours, st)
  book, first = edit.apply_edit(ours, book, batch, 0, st)
  assert bool(first.added) and int(first.index) == 1 and int(book.count) == 2
  x, y, base = _o_proj_io(ours, batch)
  # The stored key is the unrefined normalized query of the edit (NumPy from a plain forward).
  np.testing.assert_allclose(np.asarray(book.keys[1]), np_query_perc50(x[0], 4), rtol=1e-4,
                             atol=1e-5)
  book, again = edit.apply_edit(ours, book, batch, 0, st)  # same prompt and label: reuse
  assert not bool(again.added) and int(again.index) == 1 and int(book.count) == 2
  book, second = edit.apply_edit(ours, book, batch, 1, st)
  assert bool(second.added) and int(book.count) == 3
  p = batch.prompt_len - 1
  fn = jax.jit(adapter.make_adapter(book, st, jnp.asarray(p)))
  y_new = np.asarray(fn(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)), np.float64)
  diff = np.abs(y_new - y).sum(-1)
  for b in range(2):
    assert np.all(np.delete(diff[b], p[b]) < 1e-4)
    np.testing.assert_allclose(y_new[b, p[b]] - y[b, p[b]], np.asarray(book.values[b + 1]),
                               rtol=1e-3, atol=1e-3)
  # Through the whole model: logits before p are untouched, at p they change.
  ids, mask = jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask)
  edited = np.asarray(jax.jit(lambda m, i, a: forward(
      m, i, attention_mask=a, hooks=Hooks(adapters={O_PROJ: fn})).logits)(ours, ids, mask))
  for b in range(2):
    # Two compiled programs: equal up to float reassociation, far below the change at p.
    np.testing.assert_allclose(edited[b, :p[b]], base[b, :p[b]], rtol=0, atol=1e-6)
    assert np.abs(edited[b, p[b]] - base[b, p[b]]).max() > 1e-3
  # The editor trained against the model inference runs: its final loss is the CE of this forward.
  ce = float(edit.token_ce(jnp.asarray(edited[1:2]), jnp.asarray(batch.labels[1:2])))
  assert float(second.loss_last) == pytest.approx(ce, rel=1e-4)


def test_attention_output_projections_are_not_after_layer_writers():
  """Only a module whose output is its layer's last residual addition may take the fast path."""
  from horse_jax.models.init import random_model, tiny_llama_config
  model = random_model(tiny_llama_config(num_layers=2), seed=0)
  assert edit.writes_residual(model, "model.layers.1.mlp.down_proj")
  assert not edit.writes_residual(model, "model.layers.1.self_attn.o_proj")


@pytest.mark.slow
def test_horen_on_llama_o_proj_trains_the_model_inference_runs():
  """An attention output projection is followed by its layer's MLP: the editor must not train as if
  the change were added after the layer (its final loss = the CE of a forward with the adapter)."""
  from horse_jax.models.init import random_model, tiny_llama_config
  model = random_model(tiny_llama_config(num_layers=3), seed=0)
  model = type(model)(jax.tree_util.tree_map_with_path(  # sharper: the MLP's response is visible
      lambda path, x: x * 8.0 if "kernel" in jax.tree_util.keystr(path) else x, model.params),
      model.config)
  name = "model.layers.1.self_attn.o_proj"
  st = settings(layer=name, n_iter=3)
  batch = make_batch([[5, 9, 17, 33, 2]], [[40, 41]])
  book, info = edit.apply_edit(model, state.init(st, 64, 64), batch, 0, st)
  fn = adapter.make_adapter(book, st, jnp.asarray(batch.prompt_len - 1))
  hooked = jax.jit(lambda m, i, a: forward(
      m, i, attention_mask=a, hooks=Hooks(adapters={name: fn})).logits)
  logits = hooked(model, jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask))
  ce = float(edit.token_ce(logits, jnp.asarray(batch.labels)))
  assert float(info.loss_last) == pytest.approx(ce, rel=1e-4)
  assert float(info.loss_last) != pytest.approx(float(info.loss_first), rel=1e-3)  # it trained


def test_horen_on_o_proj_unmatched_query_changes_nothing(ours):
  st = settings(layer=O_PROJ, hopfield_key_match_threshold=0.999999)
  batch = make_batch(PROMPTS, [[40, 41], [41, 42], [42, 43]])
  book, _ = edit.apply_edit(ours, _book(ours, st), batch, 0, st)
  x, y, _ = _o_proj_io(ours, batch)
  fn = jax.jit(adapter.make_adapter(book, st, jnp.asarray(batch.prompt_len - 1)))
  y_new = np.asarray(fn(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)))
  np.testing.assert_allclose(y_new[1:], y[1:], atol=1e-5)


@pytest.mark.slow
def test_horen_on_o_proj_learns_its_target(ours):
  st = settings(layer=O_PROJ, n_iter=50)
  batch = make_batch([[5, 9, 17, 33, 2]], [[40]])
  book, info = edit.apply_edit(ours, _book(ours, st), batch, 0, st)
  assert float(info.loss_last) < float(info.loss_first) - 0.5
  assert float(info.edit_acc) == 1.0


def test_card_for_gpt_oss_20b():
  """The HoReN reference setting: layer 20 o_proj, threshold 0.85, float32."""
  from horse_jax.models.cards import card_for
  card = card_for("openai/gpt-oss-20b")
  assert card["name"] == "gpt-oss-20b" and card["model_type"] == "gpt_oss"
  assert card["horen"]["editor"]["layer"] == "model.layers.20.self_attn.o_proj"
  assert card["horen"]["editor"]["hopfield_key_match_threshold"] == 0.85 and card["dtype"] == "float32"
  assert card["edit_modules"] == [f"model.layers.{i}.self_attn.o_proj" for i in range(18, 24)]


@pytest.mark.slow
def test_sharded_forward_matches(ours):
  """Experts split over `model` (and attention Megatron-style): same logits as on one device."""
  ids, mask = _batch()
  mesh = make_mesh(2, 4)
  sharded = shard_model(ours, mesh)
  experts = sharded.params["model"]["layers"]["0"]["mlp"]["experts"]["gate_up_proj"]
  assert experts.sharding.spec == P("model")
  got = np.asarray(_apply(sharded, jnp.asarray(ids), jnp.asarray(mask)))
  ref = np.asarray(_apply(ours, jnp.asarray(ids), jnp.asarray(mask)))
  real = mask.astype(bool)
  np.testing.assert_allclose(got[real], ref[real], atol=1e-5)


GPT_OSS_20B = {  # the public config.json of openai/gpt-oss-20b (transformers-4 form)
    "architectures": ["GptOssForCausalLM"], "attention_bias": True, "eos_token_id": 200002,
    "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880,
    "initial_context_length": 4096, "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 12, "max_position_embeddings": 131072,
    "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4,
    "num_hidden_layers": 24, "num_key_value_heads": 8, "num_local_experts": 32,
    "pad_token_id": 199999, "quantization_config": {"quant_method": "mxfp4"},
    "rms_norm_eps": 1e-05, "rope_scaling": {
        "beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
        "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": False},
    "rope_theta": 150000, "sliding_window": 128, "swiglu_limit": 7.0,
    "tie_word_embeddings": False, "vocab_size": 201088}


@pytest.mark.parametrize("truncate", [False, True])
def test_yarn_matches_transformers_at_gpt_oss_20b_size(truncate):
  """Inverse frequencies and the cos/sin factor of the real model's rope (head_dim 64)."""
  import transformers
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

  from horse_jax.models import layers
  from horse_jax.models.config import config_from_hf
  hf = json.loads(json.dumps(GPT_OSS_20B))
  hf["rope_scaling"]["truncate"] = truncate
  cfg = config_from_hf(hf)
  assert (cfg.num_experts, cfg.experts_per_token, cfg.window) == (32, 4, 128)
  fields = {k: v for k, v in hf.items() if k not in ("architectures", "quantization_config",
                                                     "experts_per_token", "initial_context_length",
                                                     "rope_scaling", "rope_theta", "model_type")}
  ref_cfg = transformers.GptOssConfig(**fields, rope_parameters=dict(hf["rope_scaling"],
                                                                     rope_theta=150000.0))
  inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](ref_cfg, "cpu")
  np.testing.assert_allclose(layers.rope_inv_freq(cfg, 64), inv_freq.numpy(), rtol=1e-6)
  assert layers.rope_attention_factor(cfg) == pytest.approx(factor, rel=1e-12)
  assert factor > 1.3  # the scaling is really applied


def test_config_built_in_code_exports_for_transformers(tiny, ours, tmp_path):
  """A gpt-oss whose config never came from a config.json: `config_to_hf` writes one that
  transformers reads back into the same model (layer types, window, YaRN, experts)."""
  import dataclasses

  import transformers
  cfg = dataclasses.replace(ours.config, hf_config_json="{}")
  save_pretrained(type(ours)(ours.params, cfg), tmp_path / "c")
  written = json.loads((tmp_path / "c" / "config.json").read_text())
  assert written["rope_scaling"]["rope_type"] == "yarn" and written["num_experts_per_tok"] == 2
  reloaded = transformers.GptOssForCausalLM.from_pretrained(str(tmp_path / "c")).eval()
  ids, mask = _batch()
  real = mask.astype(bool)
  ref = _torch_logits(tiny[0], ids, mask)
  np.testing.assert_allclose(_torch_logits(reloaded, ids, mask)[real], ref[real], atol=1e-6)


@pytest.mark.slow
def test_bfloat16_follows_transformers_bfloat16(tiny):
  """In bfloat16 both implementations flip the same routing decisions (a top-k choice is not
  continuous), so they agree with each other far better than either does with float32."""
  import transformers
  _, folder = tiny
  ref_model = transformers.GptOssForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16)
  ref_model.config._attn_implementation = "eager"
  ids, mask = _batch()
  ref = _torch_logits(ref_model.eval(), ids, mask)
  got = np.asarray(_apply(from_pretrained(folder, dtype="bfloat16"), jnp.asarray(ids),
                          jnp.asarray(mask))).astype(np.float32)
  real = mask.astype(bool)
  np.testing.assert_array_less(np.abs(got - ref)[real].max(), 0.1)
