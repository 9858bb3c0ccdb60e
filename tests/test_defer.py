"""DEFER: the gate/adapter forward and one Adam step against NumPy float64, and sequential edits on a
tiny random Llama against a torch implementation of the reference semantics (written here)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from horse_jax.data.tokenize import IGNORE, EditBatch
from horse_jax.editors import defer
from horse_jax.editors.whole_sequence import full_sequence

D_IN, D_OUT, T = 6, 4, 5


def np_sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


@pytest.fixture(scope="module")
def case():
  rng = np.random.RandomState(0)
  params = {"gate_w": rng.randn(D_IN) * 0.5, "gate_b": np.float64(0.1),
            "value_w": rng.randn(D_IN, D_OUT), "value_b": rng.randn(D_OUT)}
  q = rng.randn(2, D_IN)
  y = rng.randn(2, T, D_OUT)
  c = rng.randn(2, T, D_OUT)  # cotangent: loss = sum(c * output)
  return params, q, y, c


def as_jax(params):
  return {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}


def test_forward_matches_numpy(case):
  params, q, y, _ = case
  g = np_sigmoid(q @ params["gate_w"] + params["gate_b"])
  v = q @ params["value_w"] + params["value_b"]
  soft = g[:, None, None] * v[:, None, :] + (1 - g[:, None, None]) * y
  got = defer.soft_output(as_jax(params), jnp.asarray(q, jnp.float32), jnp.asarray(y, jnp.float32))
  np.testing.assert_allclose(np.asarray(got), soft, rtol=1e-5, atol=1e-6)
  for thr in (0.3, float(np.sort(g)[0]) + 1e-3, 0.99):
    hard = np.where((g >= thr)[:, None, None], v[:, None, :], y)
    got = defer.hard_output(as_jax(params), jnp.asarray(True), thr, jnp.asarray(q, jnp.float32),
                            jnp.asarray(y, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), hard, rtol=1e-5, atol=1e-6)
  untrained = defer.hard_output(as_jax(params), jnp.asarray(False), 0.0, jnp.asarray(q, jnp.float32),
                                jnp.asarray(y, jnp.float32))
  np.testing.assert_allclose(np.asarray(untrained), y, rtol=1e-6)


def test_gradient_and_adam_step_match_numpy(case):
  params, q, y, c = case
  g = np_sigmoid(q @ params["gate_w"] + params["gate_b"])
  v = q @ params["value_w"] + params["value_b"]
  # d/dv of sum c (g v + (1-g) y) = g sum_t c_t; d/dg = sum_t c_t . (v - y_t)
  dv = g[:, None] * c.sum(1)
  dg = np.einsum("btd,btd->b", c, v[:, None, :] - y)
  dz = dg * g * (1 - g)
  grads = {"gate_w": dz @ q, "gate_b": dz.sum(), "value_w": q.T @ dv, "value_b": dv.sum(0)}
  loss = lambda p: jnp.sum(jnp.asarray(c, jnp.float32) * defer.soft_output(
      p, jnp.asarray(q, jnp.float32), jnp.asarray(y, jnp.float32)))
  got = jax.grad(loss)(as_jax(params))
  for k in grads:
    np.testing.assert_allclose(np.asarray(got[k]), grads[k], rtol=1e-5, atol=1e-6, err_msg=k)
  # One step of a fresh Adam (torch defaults): m_hat = g, v_hat = g^2 -> p - lr g / (|g| + eps).
  lr = 7e-5
  opt = optax.adam(lr)
  upd, _ = opt.update(got, opt.init(as_jax(params)), as_jax(params))
  stepped = optax.apply_updates(as_jax(params), upd)
  for k in grads:
    want = params[k] - lr * grads[k] / (np.abs(grads[k]) + 1e-8)
    np.testing.assert_allclose(np.asarray(stepped[k]), want, rtol=1e-5, atol=1e-7, err_msg=k)


def test_full_sequence_appends_the_last_label():
  ids = np.array([[5, 6, 7, 0, 0], [5, 6, 7, 8, 9]], np.int32)
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int32)
  labels = np.full((2, 5), IGNORE, np.int32)
  labels[0, 1:3] = [7, 11]  # prompt [5, 6], target [7, 11] -> input 5 6 7
  labels[1, 3:5] = [9, 12]
  f_ids, f_mask, f_labels, last = (np.asarray(a) for a in full_sequence(ids, mask, labels))
  np.testing.assert_array_equal(f_ids, [[5, 6, 7, 11, 0, 0], [5, 6, 7, 8, 9, 12]])
  np.testing.assert_array_equal(f_mask, [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(last, [3, 5])
  assert (f_labels[:, -1] == IGNORE).all()


# ---- end to end against torch ----

LAYER = "model.layers.1.mlp.down_proj"
EDITS = [([1, 17, 23, 40, 41], [55, 66]), ([1, 30, 31], [70, 71, 72]), ([1, 9, 8, 7, 6, 5], [44])]


def edit_batch(edits, t=12):
  n = len(edits)
  ids = np.zeros((n, t), np.int32)
  mask = np.zeros((n, t), np.int32)
  labels = np.full((n, t), IGNORE, np.int32)
  for i, (p, y) in enumerate(edits):
    seq = p + y[:-1]
    ids[i, :len(seq)], mask[i, :len(seq)] = seq, 1
    labels[i, len(p) - 1:len(p) - 1 + len(y)] = y
  return EditBatch(ids, mask, labels, np.array([len(p) for p, _ in edits], np.int32))


class TorchDefer:
  """The reference semantics in torch: the wrapped down_proj mixes (training) or switches
  (inference) on a gate of the input at the last token; Adam over the gate and adapter only."""

  def __init__(self, torch, model, state, threshold):
    self.torch, self.model, self.threshold = torch, model, threshold
    layer = model.model.layers[1].mlp
    self.original = layer.down_proj
    p = {k: torch.tensor(np.asarray(v, np.float64), dtype=torch.float32) for k, v in state.params.items()}
    self.gate = torch.nn.Linear(D_IN_T, 1)
    self.values = torch.nn.Linear(D_IN_T, D_OUT_T)
    with torch.no_grad():
      self.gate.weight.copy_(p["gate_w"][None, :])
      self.gate.bias.copy_(p["gate_b"].reshape(1))
      self.values.weight.copy_(p["value_w"].T)
      self.values.bias.copy_(p["value_b"])
    self.training = False
    outer = self

    class Wrapped(torch.nn.Module):
      def forward(self, x):
        out = outer.original(x)
        q = x[:, -1, :]
        d = torch.sigmoid(outer.gate(q))  # [1, 1]
        v = outer.values(q)
        if outer.training:
          return d * v.unsqueeze(1) + (1 - d) * out
        return torch.where(d >= outer.threshold, v.unsqueeze(1).expand_as(out), out)

    layer.down_proj = Wrapped()
    for prm in model.parameters():
      prm.requires_grad_(False)

  def edit(self, prompt, target, lr, n_iter):
    torch = self.torch
    ids = torch.tensor([prompt + target])
    labels = ids.clone()
    labels[0, :len(prompt)] = -100
    params = list(self.gate.parameters()) + list(self.values.parameters())
    opt = torch.optim.Adam(params, lr)
    self.training = True
    for _ in range(n_iter):
      loss = self.model(input_ids=ids, labels=labels).loss
      loss.backward()
      opt.step()
      opt.zero_grad()
    self.training = False

  def logits(self, seq):
    with self.torch.no_grad():
      return self.model(input_ids=self.torch.tensor([seq])).logits[0].numpy()


D_IN_T, D_OUT_T = 64, 32  # the tiny Llama's down_proj (intermediate 64 -> hidden 32)


def test_sequential_edits_match_torch(tiny_hf):
  torch = pytest.importorskip("torch")
  from horse_jax.models import from_pretrained
  torch_model, folder = tiny_hf("llama")
  import copy
  torch_model = copy.deepcopy(torch_model)
  model = from_pretrained(folder)
  cfg = defer.DeferEditorSettings(layer=LAYER, n_iter=6, edit_lr=1e-2, threshold=0.5, seed=3)
  state0 = defer.init(cfg, D_IN_T, D_OUT_T)
  ref = TorchDefer(torch, torch_model, state0, cfg.threshold)
  batch = edit_batch(EDITS)
  state, infos = defer.apply_edits(model, state0, batch, cfg)
  for p, y in EDITS:
    ref.edit(p, y, cfg.edit_lr, cfg.n_iter)
  want = {"gate_w": ref.gate.weight[0], "gate_b": ref.gate.bias[0], "value_w": ref.values.weight.T,
          "value_b": ref.values.bias}
  for k, v in want.items():
    delta_ref = v.detach().numpy() - np.asarray(state0.params[k])
    delta = np.asarray(state.params[k]) - np.asarray(state0.params[k])
    np.testing.assert_allclose(delta, delta_ref, rtol=1e-3, atol=1e-3 * np.abs(delta_ref).max(),
                               err_msg=k)
  # Scored logits: the gate decides on prompt ++ target (the last target token included).
  logits = np.asarray(defer.logits_fn(model, state, cfg)(batch))
  for i, (p, y) in enumerate(EDITS):
    full = ref.logits(p + y)
    n = len(p) + len(y) - 1
    np.testing.assert_allclose(logits[i, :n], full[:n], rtol=1e-3, atol=1e-3 * np.abs(full).max())
  assert all(np.isfinite(x["loss_last"]) for x in infos)
  assert infos[0]["loss_last"] < infos[0]["loss_first"]


def test_untrained_editor_leaves_the_model_unchanged(tiny_hf):
  pytest.importorskip("torch")
  from horse_jax.models import apply, from_pretrained
  _, folder = tiny_hf("llama")
  model = from_pretrained(folder)
  cfg = defer.DeferEditorSettings(layer=LAYER, threshold=0.0)
  batch = edit_batch(EDITS)
  got = defer.logits_fn(model, defer.init(cfg, D_IN_T, D_OUT_T), cfg)(batch)
  want = apply(model, jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask))
  real = batch.attention_mask.astype(bool)
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=1e-5, atol=1e-5)


def test_generation_redecides_on_the_whole_sequence(tiny_hf):
  """Greedy generation equals repeated scoring of the growing sequence (the gate sees its end)."""
  pytest.importorskip("torch")
  from horse_jax.models import from_pretrained
  _, folder = tiny_hf("llama")
  model = from_pretrained(folder)
  cfg = defer.DeferEditorSettings(layer=LAYER, n_iter=4, edit_lr=1e-2, threshold=0.5, seed=1)
  state, _ = defer.apply_edits(model, defer.init(cfg, D_IN_T, D_OUT_T), edit_batch(EDITS[:1]), cfg)
  prompt = [1, 17, 23, 40]
  ids = np.array([[0, 0] + prompt], np.int32)
  mask = np.array([[0, 0, 1, 1, 1, 1]], np.int32)
  got = np.asarray(defer.generate_fn(model, state, cfg)(ids, mask, 3))[0]
  seq = list(prompt)
  for _ in range(3):
    b = EditBatch(np.array([seq], np.int32), np.ones((1, len(seq)), np.int32),
                  np.full((1, len(seq)), IGNORE, np.int32), np.array([len(seq)], np.int32))
    seq.append(int(np.argmax(np.asarray(defer.logits_fn(model, state, cfg)(b))[0, -1])))
  np.testing.assert_array_equal(got, seq[len(prompt):])
