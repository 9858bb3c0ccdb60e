"""Named-module hooks checked against torch forward hooks on the same checkpoint."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from horse_jax.models import Hooks, forward, forward_from, from_pretrained, hidden_before  # noqa: E402

MODULES = {
    "llama": ("model.layers.1.mlp.down_proj", lambda m: m.model.layers[1].mlp.down_proj),
    "qwen3": ("model.layers.1.self_attn.o_proj", lambda m: m.model.layers[1].self_attn.o_proj),
    "gpt2": ("transformer.h.1.mlp.c_proj", lambda m: m.transformer.h[1].mlp.c_proj),
    "gptj": ("transformer.h.0.mlp.fc_out", lambda m: m.transformer.h[0].mlp.fc_out),
}


def _batch(b=2, t=7, seed=0):
  rng = np.random.RandomState(seed)
  ids = rng.randint(3, 101, (b, t))
  targets = rng.randint(3, 101, (b, t))
  mask = np.ones((b, t), np.int64)
  mask[0, :2] = 0
  ids[mask == 0] = 0
  return ids, targets, mask


def _torch_grad_and_input(torch_model, module, ids, targets, mask, d_out):
  """d loss / d (module output) via a zero tensor added by a torch forward hook; module input."""
  delta = torch.zeros(ids.shape + (d_out,), requires_grad=True)
  seen = {}

  def hook(mod, inputs, output):
    seen["x"] = inputs[0].detach().numpy()
    return output + delta

  handle = module.register_forward_hook(hook)
  try:
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    logits = torch_model(torch.tensor(ids), attention_mask=torch.tensor(mask),
                         position_ids=torch.tensor(positions)).logits
    logp = torch.log_softmax(logits, dim=-1)
    picked = torch.gather(logp, -1, torch.tensor(targets)[..., None])[..., 0]
    loss = -(picked * torch.tensor(mask, dtype=torch.float32)).sum()
    loss.backward()
  finally:
    handle.remove()
  return delta.grad.numpy(), seen["x"]


def _loss(model, ids, targets, mask, hooks):
  logits = forward(model, ids, attention_mask=mask, hooks=hooks).logits
  logp = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return -(picked * mask).sum()


@pytest.mark.parametrize("arch", sorted(MODULES))
def test_offset_gradient_and_capture_match_torch_hooks(arch, tiny_hf):
  torch_model, folder = tiny_hf(arch)
  name, get_module = MODULES[arch]
  model = from_pretrained(folder)
  ids, targets, mask = _batch()
  d = model.config.hidden_size
  ref_grad, ref_input = _torch_grad_and_input(torch_model, get_module(torch_model), ids, targets,
                                              mask, d)
  zero = jnp.zeros(ids.shape + (d,), jnp.float32)
  grad = jax.grad(lambda off: _loss(model, jnp.asarray(ids), jnp.asarray(targets),
                                    jnp.asarray(mask, jnp.float32), Hooks(offsets={name: off})))(zero)
  assert np.abs(ref_grad).max() > 1e-3
  np.testing.assert_allclose(np.asarray(grad), ref_grad, atol=1e-5 * np.abs(ref_grad).max() + 1e-6)
  captured = forward(model, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                     hooks=Hooks(capture=(name,))).captured
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(captured[name])[real], ref_input[real], atol=1e-5)


def test_adapter_sees_input_and_output_and_replaces_output(tiny_hf):
  _, folder = tiny_hf("llama")
  model = from_pretrained(folder)
  ids, _, mask = _batch()
  name = "model.layers.0.mlp.down_proj"
  seen = {}
  rng = np.random.RandomState(1)
  shift = jnp.asarray(rng.randn(*ids.shape, model.config.hidden_size).astype(np.float32))

  def adapter(x, y):
    seen["x"], seen["y"] = x, y
    return y + shift

  out = forward(model, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                hooks=Hooks(capture=(name,), adapters={name: adapter}))
  same = forward(model, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                 hooks=Hooks(offsets={name: shift}))
  np.testing.assert_allclose(np.asarray(out.logits), np.asarray(same.logits), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(seen["x"]), np.asarray(out.captured[name]))
  kernel = np.asarray(model.params["model"]["layers"]["0"]["mlp"]["down_proj"]["kernel"])
  np.testing.assert_allclose(np.asarray(seen["y"]), np.asarray(seen["x"]) @ kernel, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gptj"])
def test_forward_from_hidden_before_equals_forward(arch, tiny_hf):
  _, folder = tiny_hf(arch)
  model = from_pretrained(folder)
  ids, _, mask = _batch()
  name = MODULES[arch][0]
  hooks = Hooks(capture=(name,))
  full = forward(model, jnp.asarray(ids), attention_mask=jnp.asarray(mask), hooks=hooks)
  h = hidden_before(model, 0 if arch == "gptj" else 1, jnp.asarray(ids),
                    attention_mask=jnp.asarray(mask))
  rest = forward_from(model, 0 if arch == "gptj" else 1, h, attention_mask=jnp.asarray(mask),
                      hooks=hooks)
  np.testing.assert_allclose(np.asarray(rest.logits), np.asarray(full.logits), atol=1e-5)
  np.testing.assert_allclose(np.asarray(rest.captured[name]), np.asarray(full.captured[name]),
                             atol=1e-5)
