"""ROME / MEMIT / AlphaEdit: closed forms against NumPy float64, the covariance accumulation, and
whole edits against a torch implementation of the HoReN reference's semantics (written here)."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from horse_jax.cli.main import main
from horse_jax.data.records import EditRecord
from horse_jax.editors.locate import solve, stats
from horse_jax.editors.protocol import make_editor, resolve_settings
from horse_jax.models import Hooks, forward, from_pretrained, load_tokenizer

WORLD = Path(__file__).resolve().parents[1] / "checkpoints" / "world"


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _spd(rng, d, low=0.5, high=3.0):
  q, _ = np.linalg.qr(rng.standard_normal((d, d)))
  return (q * rng.uniform(low, high, d)) @ q.T


# ---- closed forms, against NumPy float64 written from the formulas ----


def test_rome_rank_one_update_matches_numpy():
  rng = np.random.default_rng(0)
  d_in, d_out = 24, 16
  cov, k_mean, k0 = _spd(rng, d_in), rng.standard_normal(d_in), rng.standard_normal(d_in)
  z, cur = rng.standard_normal(d_out), rng.standard_normal(d_out)
  u = np.linalg.inv(cov) @ k_mean
  u /= np.linalg.norm(u)
  v = (z - cur) / (k0 @ u)
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  left = solve.rome_left(f32(k_mean), f32(cov))
  right = solve.rome_right(f32(z), f32(cur), f32(k0), left)
  assert _rel(left, u) < 1e-5 and _rel(right, v) < 1e-5
  assert _rel(solve.rome_shift(left, right), np.outer(u, v)) < 1e-5
  # Without the second moment: u is the normalised mean key.
  assert _rel(solve.rome_left(f32(k_mean)), k_mean / np.linalg.norm(k_mean)) < 1e-5


def test_memit_spread_and_solve_match_numpy():
  rng = np.random.default_rng(1)
  d_in, d_out, n, lam = 20, 12, 3, 20000.0
  cov = _spd(rng, d_in, 1e-4, 1e-3)
  keys, z, cur = rng.standard_normal((n, d_in)), rng.standard_normal((n, d_out)), rng.standard_normal((n, d_out))
  resid = (z - cur) / 3
  kd = keys.T  # the reference's layer_ks [d_in, n]
  adj = np.linalg.solve(lam * cov + kd @ kd.T, kd)
  expected = (resid.T @ adj.T).T  # the reference's weight update [d_out, d_in], as a kernel shift
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  got_resid = solve.spread(f32(z), f32(cur), 3)
  assert _rel(got_resid, resid) < 1e-5
  assert _rel(solve.memit_shift(f32(keys), got_resid, f32(cov), lam), expected) < 1e-5


def test_alphaedit_projector_solve_and_cache_match_numpy():
  rng = np.random.default_rng(2)
  d_in, d_out, n, thr, l2 = 16, 10, 2, 2e-2, 10.0
  q, _ = np.linalg.qr(rng.standard_normal((d_in, d_in)))
  eig = np.concatenate([rng.uniform(1e-4, 1e-2, 6), rng.uniform(0.1, 2.0, d_in - 6)])
  cov = (q * eig) @ q.T
  keys, resid = rng.standard_normal((n, d_in)), rng.standard_normal((n, d_out))
  cache = _spd(rng, d_in)
  u, s, _ = np.linalg.svd(cov)
  small = u[:, s < thr]
  p = small @ small.T
  kd = keys.T
  expected = np.linalg.solve(p @ (kd @ kd.T + cache) + l2 * np.eye(d_in), p @ kd @ resid)
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  got_p, dims = solve.null_space_projector(f32(cov), thr)
  assert int(dims) == 6 and _rel(got_p, p) < 1e-5
  assert _rel(solve.alphaedit_shift(f32(keys), f32(resid), got_p, f32(cache), l2), expected) < 1e-5
  assert _rel(solve.cache_update(f32(cache), f32(keys)), cache + kd @ kd.T) < 1e-5


def test_covariance_accumulation_matches_numpy(tiny_hf):
  _, folder = tiny_hf("llama", vocab_size=2048)
  model, tok = from_pretrained(folder), load_tokenizer(WORLD / "model")
  texts = ["What is the birthplace of Vasa? Harwick Falls", "Neikuth likes which colour best?",
           "Where was Zapous born? Talmor Crossing", "Vasa"] * 3
  mods = ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj")
  got = stats.accumulate_moments(model, stats.corpus_batches(tok, texts, 64, tokens_per_batch=32), mods)
  for m in mods:
    xs = []
    for t in texts:
      ids = np.asarray([tok(t)["input_ids"]])
      xs.append(np.asarray(forward(model, ids, hooks=Hooks(capture=(m,))).captured[m][0], np.float64))
    x = np.concatenate(xs)
    assert _rel(got[m], x.T @ x / len(x)) < 1e-5


# ---- whole edits against a torch implementation of the reference's semantics ----

PROMPT, SUBJECT, TARGET = "What is the birthplace of Vasa?", "Vasa", "Harwick Falls"
TEMPLATES = ["Where was Zapous born. {}", "Neikuth likes which colour best. {}"]
CORPUS = stats.world_corpus()[::50]  # 400 texts: C of the 64-wide down_proj input has full rank


def _torch_reference(torch_model, tok, method, layers, hp, cov_texts):
  """The reference's ROME (`compute_u`, `compute_v`) or MEMIT/AlphaEdit (`compute_ks`,
  `compute_z`, the spread and solve) for one request, as torch weight deltas {layer: [out, in]}."""
  import torch
  torch.set_num_threads(1)
  mlp = lambda i: torch_model.model.layers[i].mlp  # noqa: E731
  down = lambda i: mlp(i).down_proj  # noqa: E731

  def capture_in(module, batch):
    got = []
    h = module.register_forward_hook(lambda m, i, o: got.append(i[0].detach()))
    with torch.no_grad():
      torch_model(**batch)
    h.remove()
    return got[0]

  def cov(i):  # uncentred mean of x x^T over every token, BOS included
    xs = [capture_in(down(i), tok(t, return_tensors="pt"))[0] for t in cov_texts]
    x = torch.cat(xs).double()
    return (x.T @ x / x.shape[0]).float()

  ptmp = PROMPT.replace(SUBJECT, "{}")
  ctxs = ["{}"] + TEMPLATES
  idx = lambda t: len(tok.encode(t.split("{}")[0] + SUBJECT)) - 1  # noqa: E731
  key_texts = [c.format(ptmp) for c in ctxs]
  key_batch = tok([k.format(SUBJECT) for k in key_texts], padding=True, return_tensors="pt")

  def keys(i):
    x = capture_in(down(i), key_batch)
    k = torch.stack([x[j, idx(t)] for j, t in enumerate(key_texts)])
    return k.mean(0) if method == "rome" else (k[:1].mean(0) + k[1:].mean(0)) / 2

  def layer_out(i):  # decoder layer output at the bare prompt's subject-last token
    got = []
    h = torch_model.model.layers[i].register_forward_hook(
        lambda m, a, o: got.append((o[0] if isinstance(o, tuple) else o).detach()))
    with torch.no_grad():
      torch_model(**key_batch)
    h.remove()
    return got[0][0, idx(key_texts[0])]

  target_ids = tok.encode(" " + TARGET, add_special_tokens=False)
  rewriting = [c.format(ptmp) + tok.decode(target_ids[:-1]) for c in ctxs]
  prompts = rewriting + ["{} is a"]
  batch = tok([p.format(SUBJECT) for p in prompts], padding=True, return_tensors="pt")
  labels = torch.full(batch["input_ids"].shape, -100)
  for j in range(len(rewriting)):
    n = int(batch["attention_mask"][j].sum())
    labels[j, n - len(target_ids):n] = torch.tensor(target_ids)
  lookups = [idx(p) for p in prompts]

  def optimise(layer, at_mlp):
    delta = torch.zeros(torch_model.config.hidden_size, requires_grad=True)
    state = {"init": None}
    sel = torch.zeros(batch["input_ids"].shape + (1,))
    for j, i in enumerate(lookups):
      sel[j, i] = 1

    def hook(m, a, out):
      o = out[0] if isinstance(out, tuple) else out
      if state["init"] is None:
        state["init"] = o[0, lookups[0]].detach().clone()
      o = o + sel * delta
      return (o,) + tuple(out[1:]) if isinstance(out, tuple) else o

    h = (mlp(layer) if at_mlp else torch_model.model.layers[layer]).register_forward_hook(hook)
    opt = torch.optim.Adam([delta], lr=hp["v_lr"])
    kl_init = None
    for it in range(hp["v_num_grad_steps"]):
      opt.zero_grad()
      logits = torch_model(**batch).logits
      kl_lp = torch.log_softmax(logits[-1:, lookups[-1]], -1)
      if kl_init is None:
        kl_init = kl_lp.detach().clone()
      lp = torch.log_softmax(logits[:len(rewriting)], -1)
      picked = torch.gather(lp, 2, torch.where(labels[:len(rewriting)] != -100, labels[:len(rewriting)], 0)
                            .unsqueeze(2)).squeeze(2)
      nll = (-(picked * (labels[:len(rewriting)] != -100)).sum(1) / len(target_ids)).mean()
      kl = hp["kl_factor"] * torch.nn.functional.kl_div(kl_init, kl_lp, log_target=True, reduction="batchmean")
      loss = nll + kl + hp["v_weight_decay"] * (torch.norm(delta) / torch.norm(state["init"]) ** 2)
      if loss < 5e-2 or it == hp["v_num_grad_steps"] - 1:
        break
      loss.backward()
      opt.step()
      max_norm = hp["clamp_norm_factor"] * state["init"].norm()
      if delta.norm() > max_norm:
        with torch.no_grad():
          delta[...] = delta * max_norm / delta.norm()
    h.remove()
    return (state["init"] + delta).detach()

  originals = {i: down(i).weight.detach().clone() for i in layers}
  out = {}
  try:
    if method == "rome":
      layer = layers[0]
      u = torch.linalg.inv(cov(layer)) @ keys(layer)
      u = u / u.norm()
      z = optimise(layer, at_mlp=True)
      k0 = capture_in(down(layer), key_batch)[0, idx(key_texts[0])]
      with torch.no_grad():
        cur = down(layer)(k0)
      out[layer] = torch.outer((z - cur) / torch.dot(k0, u), u)
    else:
      z_layer = layers[-1]
      z = optimise(z_layer, at_mlp=False)
      covs = {i: cov(i) for i in layers}  # the unedited model's statistics
      for n, layer in enumerate(layers):
        k = keys(layer)[:, None].double()
        resid = ((z - layer_out(z_layer)) / (len(layers) - n))[:, None].double()
        if method == "memit":
          adj = torch.linalg.solve(hp["mom2_update_weight"] * covs[layer].double() + k @ k.T, k)
          upd = (resid @ adj.T).float()
        else:
          uu, s, _ = torch.linalg.svd(covs[layer])
          small = uu[:, s < hp["nullspace_threshold"]]
          p = (small @ small.T).double()
          upd = torch.linalg.solve(p @ (k @ k.T) + hp["L2"] * torch.eye(k.shape[0], dtype=torch.float64),
                                   p @ k @ resid.T).T.float()
        with torch.no_grad():
          down(layer).weight += upd
        out[layer] = upd
  finally:
    with torch.no_grad():
      for i, w in originals.items():
        down(i).weight[...] = w
  return {i: d.numpy() for i, d in out.items()}


HP = {"rome": dict(v_num_grad_steps=6, v_lr=0.5, v_weight_decay=1e-3, clamp_norm_factor=4.0,
                   kl_factor=0.0625),
      "memit": dict(v_num_grad_steps=6, v_lr=0.5, v_weight_decay=0.5, clamp_norm_factor=3.0,
                    kl_factor=0.0625, mom2_update_weight=20.0),
      "alphaedit": dict(v_num_grad_steps=6, v_lr=0.1, v_weight_decay=0.5, clamp_norm_factor=0.75,
                        kl_factor=0.0625, nullspace_threshold=2e-2, L2=10.0)}
LAYERS = {"rome": [0], "memit": [0, 1], "alphaedit": [0, 1]}


@pytest.mark.parametrize("method", ["rome", "memit", "alphaedit"])
def test_edit_matches_torch_reference(method, tiny_hf, tmp_path):
  pytest.importorskip("torch")
  # Three layers: the target layer must have a layer above it, or delta at the subject token cannot
  # reach the target positions (zero gradient, and Adam's eps decides the direction).
  torch_model, folder = tiny_hf("llama", vocab_size=2048, num_hidden_layers=3)
  tok = load_tokenizer(WORLD / "model")
  model = from_pretrained(folder)
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(CORPUS) + "\n")
  sets = [f"editor.{k}={v}" for k, v in HP[method].items()] + [
      f"editor.layers={LAYERS[method]}", f"editor.stats_dir={tmp_path / 'stats'}",
      f"editor.context_templates={json.dumps(TEMPLATES)}"]
  settings = resolve_settings(method, folder, model, overrides=sets)
  editor = make_editor(method, model, tok, settings, stats_corpus=str(corpus))
  state, _ = editor.edit(editor.init(jax.random.PRNGKey(0)),
                         [EditRecord(PROMPT, TARGET, extra={"subject": SUBJECT})])
  expected = _torch_reference(torch_model, tok, method, LAYERS[method], HP[method], CORPUS)
  for layer, delta in expected.items():
    got = np.asarray(state.shifts[f"model.layers.{layer}.mlp.down_proj"]).T
    assert _rel(got, delta) < 1e-3, (layer, _rel(got, delta))
  # The statistics were cached: a second editor reads them instead of recomputing.
  assert list((tmp_path / "stats").rglob("*.npy"))


# ---- the command line and the shipped reference settings ----


def _edit(out, method, *extra):
  return main(["edit", "--method", method, "--model", str(WORLD / "model"), "--data",
               str(WORLD / "data" / "zsre_test.json"), "--n-edits", "2", "--out", str(out),
               "--set", "editor.v_num_grad_steps=4", "editor.mom2_n_samples=500",
               f"editor.stats_dir={out.parent / 'stats'}", *extra])


def test_cli_rome_writes_deltas_metrics_and_reads_the_cached_statistics(tmp_path):
  assert _edit(tmp_path / "a", "rome") == 0
  metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
  assert metrics["edit_modules"] == ["model.layers.1.mlp.down_proj"]  # the world card
  assert len(metrics["targets"]) == 2
  assert (tmp_path / "a" / "deltas.safetensors").is_file()
  assert len(list((tmp_path / "stats").rglob("*.npy"))) == 1
  assert metrics["effective_settings"]["editor.layers"]["source"] == "card"


def test_cli_locate_user_errors(tmp_path, capsys):
  assert _edit(tmp_path / "b", "rome", "editor.layers=[9]") != 0
  assert "layer 9 does not exist" in capsys.readouterr().err
  assert _edit(tmp_path / "c", "memit", "--stats-corpus", str(tmp_path / "missing.txt")) != 0
  assert "file not found" in capsys.readouterr().err
  assert _edit(tmp_path / "d", "rome", "editor.v_lrr=1") != 0
  assert "did you mean 'editor.v_lr'" in capsys.readouterr().err


@pytest.mark.parametrize("method,folder", [("rome", "ROME"), ("memit", "MEMIT"), ("alphaedit", "AlphaEdit")])
def test_shipped_reference_hparams_read_as_written(method, folder):
  from horse_jax import settings as settings_lib
  path = Path(__file__).resolve().parents[1] / "hparams" / folder / "llama3-8b.yaml"
  resolved = settings_lib.resolve(method, configs=[path])
  expected = {"rome": ((5,), 25, 0.5), "memit": ((4, 5, 6, 7, 8), 20, 0.5),
              "alphaedit": ((4, 5, 6, 7, 8), 25, 0.1)}[method]
  typed = resolved.typed.editor
  assert (tuple(typed.layers), typed.v_num_grad_steps, typed.v_lr) == expected
  assert resolved.sources["editor.v_lr"] == "config"
  assert "mom2_dataset" in resolved.ignored and "model_name" in resolved.ignored
  with pytest.raises(Exception, match="unknown setting 'v_lrr'"):
    settings_lib.resolve(method, overrides=["v_lrr=1"])


@pytest.mark.slow
def test_rome_on_a_mesh_of_8_devices_equals_one_device(tmp_path):
  from horse_jax import meshes, runtime
  from horse_jax.data import load_records
  records = load_records(str(WORLD / "data" / "zsre_test.json"), limit=2)
  shifts = []
  for spec in (None, "2x4"):
    mesh, _ = meshes.device_mesh(spec, False, str(WORLD / "model"))
    model, tok = runtime.load_model(WORLD / "model", mesh=mesh)
    settings = resolve_settings("rome", str(WORLD / "model"), model, overrides=[
        "editor.v_num_grad_steps=4", "editor.mom2_n_samples=500", f"editor.stats_dir={tmp_path}"])
    editor = make_editor("rome", model, tok, settings, mesh=mesh)
    state, _ = editor.edit(editor.init(jax.random.PRNGKey(0)), records)
    shifts.append(np.asarray(state.shifts["model.layers.1.mlp.down_proj"]))
  assert _rel(shifts[1], shifts[0]) < 1e-4
