"""UltraEdit: the update against NumPy float64, whole edits against a torch implementation of the
reference's semantics, meshes against one device, and the reference's hparams file read as written.
"""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from horse_jax import settings as settings_lib
from horse_jax.data import load_records
from horse_jax.editors.hypernet import normalizer
from horse_jax.editors.hypernet.config import HypernetConfig
from horse_jax.editors.protocol import make_editor, resolve_settings
from horse_jax.editors.ultraedit import editor as ue
from horse_jax.errors import UserError
from horse_jax.models import from_pretrained, load_tokenizer, make_mesh, shard_model

WORLD = "checkpoints/world/model"
EPS = float(np.finfo(np.float32).eps)


def rel(a, b):
  a, b = np.float64(a), np.float64(b)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


# ---------------------------------------------------------------- the update, NumPy float64


def np_update(norm, x):
  """The running statistics folded with rows x (float64, written from the formulas)."""
  n, mean, var = norm
  m = x.shape[0]
  total = n + m
  delta = x.mean(0) - mean
  return (total, mean + m * delta / total,
          var + m * x.var(0, ddof=1) + n * m * delta ** 2 / total)


def np_step(norms, keys, grads, batches, modules, shape_of, lr):
  """Statistics per shape updated for each (mini-batch, module) in turn, then per module
  v = -lr |k^|^2 g^ and S = (K^T K + I)^-1 K^T V with raw keys."""
  norms = dict(norms)
  for rows in batches:
    for m in modules:
      x = np.concatenate([keys[m][rows], grads[m][rows]], 1)
      norms[shape_of[m]] = np_update(norms[shape_of[m]], x)
  shifts = {}
  for m in modules:
    n, mean, var = norms[shape_of[m]]
    std = np.sqrt(var / (n - 1 + EPS))
    k, g = keys[m], grads[m]
    z = (np.concatenate([k, g], 1) - mean) / (std + EPS)
    kh, gh = z[:, :k.shape[1]], z[:, k.shape[1]:]
    v = -lr * np.sum(kh * kh, 1, keepdims=True) * gh
    shifts[m] = np.linalg.solve(k.T @ k + np.eye(k.shape[1]), k.T @ v)
  return shifts, norms


def test_update_matches_numpy_float64():
  """Shared statistics per shape (two gate/up modules of one shape, one down_proj), a lifelong prior,
  three mini-batches of different sizes, padding rows, value shifts in chunks."""
  rng = np.random.default_rng(0)
  modules = ("model.layers.0.mlp.gate_proj", "model.layers.1.mlp.down_proj",
             "model.layers.2.mlp.up_proj")
  shapes = ((8, 12), (12, 8), (8, 12))
  cfg = HypernetConfig(method="ultraedit", modules=modules, shapes=shapes, chunk=5, token="all",
                       lm_batch=1)
  sizes = (7, 5, 4)
  n_real, n_pad = sum(sizes), 4
  keys = {m: rng.normal(size=(n_real, s[0])) * (1 + i) for i, (m, s) in enumerate(zip(modules, shapes))}
  grads = {m: rng.normal(size=(n_real, s[1])) * 1e-2 + 3e-3 for m, s in zip(modules, shapes)}
  bounds = np.cumsum((0,) + sizes)
  batches = [np.arange(bounds[j], bounds[j + 1]) for j in range(len(sizes))]
  shape_of = dict(zip(modules, cfg.shape_keys))
  prior = {}
  for key, (k, v) in zip(cfg.shape_keys, shapes):  # statistics of earlier steps (lifelong)
    x = rng.normal(size=(9, k + v)) * 0.5 + 0.2
    prior[key] = np_update((0.0, np.zeros(k + v), np.zeros(k + v)), x)
  lr = 3e-2
  want, want_norms = np_step(prior, keys, grads, batches, modules, shape_of, lr)

  pad = lambda x: jnp.asarray(np.concatenate([x, rng.normal(size=(n_pad, x.shape[1]))]), jnp.float32)
  valid = jnp.asarray([1.0] * n_real + [0.0] * n_pad)
  row_batch = jnp.asarray(np.concatenate([np.full(s, j) for j, s in enumerate(sizes)]
                                         + [np.full(n_pad, len(sizes))]), jnp.int32)
  norms = {key: normalizer.NormState(jnp.float32(n), jnp.asarray(mean, jnp.float32),
                                     jnp.asarray(var, jnp.float32))
           for key, (n, mean, var) in prior.items()}
  got, got_norms = jax.jit(ue.update_from_cache, static_argnames=("cfg",))(
      norms, {m: pad(keys[m]) for m in modules}, {m: pad(grads[m]) for m in modules}, valid,
      row_batch, jnp.asarray(sizes, jnp.int32), jnp.float32(lr), cfg=cfg)
  for m in modules:
    assert rel(got[m], want[m]) < 1e-5, m
  for key, (n, mean, var) in want_norms.items():
    assert float(got_norms[key].n) == n
    assert rel(got_norms[key].mean, mean) < 1e-5 and rel(got_norms[key].var, var) < 1e-5


def test_tokenization_puts_bos_and_target_on_the_last_logits():
  tok = load_tokenizer(WORLD)
  ids, labels = ue.tokenize_request(tok, "Neikuth likes which colour best?", "mustard yellow")
  full = tok("Neikuth likes which colour best? mustard yellow")["input_ids"]
  target = tok(" mustard yellow")["input_ids"]  # BOS included
  assert list(ids) == full and target[0] == tok.bos_token_id
  n, t = len(full), len(target)
  assert list(labels[n - 1 - t:n - 1]) == target and (labels[:n - 1 - t] == -100).all()
  assert labels[-1] == -100


# ---------------------------------------------------------------- against torch (reference semantics)

MODULES = ("model.layers.0.mlp.gate_proj", "model.layers.1.mlp.up_proj",
           "model.layers.1.mlp.down_proj")


def torch_ultraedit(model, tok, records, modules, lr, batch_size, lifelong):
  """UltraEdit as the reference runs it, one request per forward pass, written from its semantics:
  per call of batch_size requests, requests sorted longest first, the statistics of each weight
  shape updated for each (request, module) in turn, then value shifts and ridge solves, W += S^T.

  Returns:
    {module: final weight - initial weight} in kernel layout [d_in, d_out] (float64 NumPy).
  """
  import torch
  import torch.nn.functional as F

  def get(name):
    mod = model
    for part in name.split("."):
      mod = getattr(mod, part)
    return mod

  start = {m: get(m).weight.detach().clone() for m in modules}
  for p in model.parameters():
    p.requires_grad_(False)
  for m in modules:
    get(m).weight.requires_grad_(True)
  stats = {}
  for first in range(0, len(records), batch_size):
    if not lifelong:
      stats = {}
    reqs = []
    for r in records[first:first + batch_size]:
      t = r.target if r.target.startswith(" ") else " " + r.target
      reqs.append((tok(r.prompt + t)["input_ids"], tok(t)["input_ids"]))
    reqs = sorted(reqs, key=lambda r: -len(r[0]))
    cache = {m: ([], []) for m in modules}
    for ids, lab in reqs:
      seen = {}
      handles = []
      for m in modules:
        def hook(mod, inp, out, m=m):
          seen[m] = [inp[0].detach()]
          out.register_hook(lambda g, m=m: seen[m].append(g.detach()))
        handles.append(get(m).register_forward_hook(hook))
      logits = model(input_ids=torch.tensor([ids])).logits
      loss = F.cross_entropy(logits[0, :-1][-len(lab):], torch.tensor(lab))
      loss.backward()
      for h in handles:
        h.remove()
      for m in modules:
        k, g = seen[m][0][0].float(), seen[m][1][0].float()
        shape = tuple(get(m).weight.shape[::-1])
        x = torch.cat([k, g], -1)
        n, mean, var = stats.get(shape, (0.0, torch.zeros(x.shape[1]), torch.zeros(x.shape[1])))
        total = n + x.shape[0]
        delta = x.mean(0) - mean
        mean = mean + x.shape[0] * delta / total
        var = var + x.shape[0] * x.var(0) + n * x.shape[0] * delta ** 2 / total
        stats[shape] = (total, mean, var)
        cache[m][0].append(k)
        cache[m][1].append(g)
    shifts = {}
    for m in modules:
      k, g = torch.cat(cache[m][0]), torch.cat(cache[m][1])
      n, mean, var = stats[tuple(get(m).weight.shape[::-1])]
      eps = torch.finfo(torch.float32).eps
      z = (torch.cat([k, g], -1) - mean) / ((var / (n - 1 + eps)).sqrt() + eps)
      kh, gh = z.split([k.shape[1], g.shape[1]], -1)
      v = -lr * (kh * kh).sum(-1, keepdim=True) * gh
      shifts[m] = torch.linalg.solve(k.T @ k + torch.eye(k.shape[1]), k.T @ v)
    with torch.no_grad():
      for m in modules:
        get(m).weight += shifts[m].T
  return {m: (get(m).weight.detach() - start[m]).T.double().numpy() for m in modules}


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
  """A tiny random Llama with the world's tokenizer (its vocabulary), and six world records."""
  pytest.importorskip("torch")
  from conftest import build_tiny_hf
  folder = tmp_path_factory.mktemp("ue-tiny")
  torch_model = build_tiny_hf("llama", folder, vocab_size=2048, max_position_embeddings=128)
  for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    shutil.copy(f"{WORLD}/{name}", folder / name)
  records = load_records("checkpoints/world/data/zsre_test.json", limit=6)
  return torch_model, str(folder), records


@pytest.mark.parametrize("batch_size,lifelong", [(2, True), (3, False)])
def test_edits_match_a_torch_implementation_of_the_reference(tiny_world, batch_size, lifelong):
  import copy
  torch_model, folder, records = tiny_world
  model, tok = from_pretrained(folder), load_tokenizer(folder)
  lr = 5e-2
  overrides = [f"model.edit_modules=[{','.join(MODULES)}]", f"editor.lr={lr}",
               f"editor.batch_size={batch_size}", f"editor.lifelong_normalizer={str(lifelong).lower()}",
               "editor.editor_batch_size=7"]
  editor = make_editor("ultraedit", model, tok, resolve_settings("ultraedit", folder, model,
                                                                  overrides=overrides))
  state, _ = editor.edit(editor.init(jax.random.PRNGKey(0)), records[:batch_size])
  state, _ = editor.edit(state, records[batch_size:])  # a second call continues with the next steps
  want = torch_ultraedit(copy.deepcopy(torch_model), tok, records, MODULES, lr, batch_size, lifelong)
  for m in MODULES:
    assert np.abs(want[m]).max() > 1e-3  # the edit is not negligible
    assert rel(state.deltas[m], want[m]) < 1e-3, m
  assert state.n_edits == 6


# ---------------------------------------------------------------- meshes


@pytest.mark.parametrize("mesh_shape", [(2, 4), pytest.param((1, 8), marks=pytest.mark.slow)])
def test_mesh_edit_equals_single_device(mesh_shape):
  model, tok = from_pretrained(WORLD), load_tokenizer(WORLD)
  records = load_records("checkpoints/world/data/zsre_test.json", limit=8)
  # MLP input projections: their ridge matrices are well conditioned on the world (condition ~5e3;
  # the down_proj inputs reach ~1e6, where float32 solves differ by 1e-2 with the summation order).
  mods = "[model.layers.0.mlp.gate_proj,model.layers.1.mlp.gate_proj,model.layers.2.mlp.up_proj]"
  overrides = ["editor.lr=1e-3", "editor.batch_size=4", "editor.batch_size_once=2",
               f"model.edit_modules={mods}"]
  one = make_editor("ultraedit", model, tok, resolve_settings("ultraedit", WORLD, model,
                                                               overrides=overrides))
  want, _ = one.edit(one.init(None), records)
  mesh = make_mesh(*mesh_shape)
  sharded = shard_model(model, mesh)
  many = make_editor("ultraedit", sharded, tok, resolve_settings("ultraedit", WORLD, model,
                                                                  overrides=overrides), mesh=mesh)
  got, _ = many.edit(many.init(None), records)
  for m, d in got.deltas.items():
    assert rel(d, want.deltas[m]) < 1e-4, m
    if d.shape[1] % mesh_shape[1] == 0:  # shifts split by column over `model`
      assert d.sharding.shard_shape(d.shape)[1] == d.shape[1] // mesh_shape[1]


# ---------------------------------------------------------------- settings


def test_reference_hparams_file_is_read_as_written(tmp_path):
  """The shipped copy of the reference's hparams/ULTRAEDIT/llama3-8b.yaml, and its typos refused."""
  import pathlib
  path = pathlib.Path(__file__).parents[1] / "hparams" / "ULTRAEDIT" / "llama3-8b.yaml"
  r = settings_lib.resolve("ultraedit", configs=[path])
  assert r["model.edit_modules"] == [f"model.layers.{i}.mlp.gate_proj" for i in range(11, 16)] + [
      f"model.layers.{i}.mlp.up_proj" for i in range(18, 25)]
  assert r["editor.lr"] == 1e-6 and r["editor.token"] == "mask"
  assert r["editor.batch_size"] == 1 and r["editor.batch_size_once"] == 1
  assert r["editor.editor_batch_size"] == 1024 and r["editor.lifelong_normalizer"] is True
  assert r["model.dtype"] == "float16"  # half: true wins over bf16: true (model.half() after loading)
  assert all(r.sources[k] == "config" for k in ("editor.lr", "model.edit_modules", "model.dtype"))
  for key in ("model_name", "tokenizer_class", "alg", "no_grad_layers", "silent", "results_dir"):
    assert r.ignored[key].startswith("ignored"), key
  bad = tmp_path / "typo.yaml"
  bad.write_text(path.read_text().replace("lr: 1e-6", "lrr: 1e-6"))
  with pytest.raises(UserError, match=r"unknown setting 'lrr' for ultraedit; did you mean 'lr'"):
    settings_lib.resolve("ultraedit", configs=[bad])
  bad.write_text(path.read_text().replace("ULTRAEDIT", "HOREN"))
  with pytest.raises(UserError, match="does not match --method ultraedit"):
    settings_lib.resolve("ultraedit", configs=[bad])
  with pytest.raises(UserError, match="multiple of editor.batch_size_once"):
    settings_lib.resolve("ultraedit", overrides=["editor.batch_size=3", "editor.batch_size_once=2"])
  with pytest.raises(UserError, match="expected one of mask"):
    settings_lib.resolve("ultraedit", overrides=["editor.token=ans"])


@pytest.mark.slow
def test_cli_edits_the_world_in_steps(tmp_path, capsys):
  """`horse-jax edit --method ultraedit`: deltas, the edited checkpoint and metrics with provenance."""
  import json

  from horse_jax.cli.main import main
  out = tmp_path / "ue"
  assert main(["edit", "--method", "ultraedit", "--model", WORLD, "--data",
               "checkpoints/world/data/zsre_test.json", "--n-edits", "6", "--out", str(out),
               "--set", "editor.batch_size=4", "editor.batch_size_once=2"]) == 0
  metrics = json.loads((out / "metrics.json").read_text())
  eff = metrics["effective_settings"]
  assert eff["editor.batch_size"] == {"value": 4, "source": "set"}
  assert eff["editor.lr"]["source"] == "card" and eff["model.edit_modules"]["source"] == "card"
  assert metrics["edit_steps"] == 2 and (out / "deltas.safetensors").is_file()
  assert (out / "model" / "config.json").is_file()
  assert main(["edit", "--method", "ultraedit", "--model", WORLD, "--data",
               "checkpoints/world/data/zsre_test.json", "--out", str(tmp_path / "x"), "--hypernet",
               "init"]) == 2
  assert "--hypernet does not apply to --method ultraedit" in capsys.readouterr().err


def test_sweep_adapter_edits_through_the_protocol():
  from horse_jax.eval import methods
  model, tok = from_pretrained(WORLD), load_tokenizer(WORLD)
  records = load_records("checkpoints/world/data/zsre_test.json", limit=3)
  ctx = methods.CellContext(model=model, tokenizer=tok, score=None, logits_fn=None, generate_fn=None,
                            model_path=WORLD)
  adapter = methods.SEQUENTIAL["ultraedit"]
  entry = {"name": "ultraedit", "settings": {"editor": {"batch_size": 2}}}
  state = adapter.edit(ctx, adapter.start(ctx, entry, 0), records)
  assert state[1].n_edits == 3 and float(state[1].norms["128x768"].n) > 0
  logits_fn, gen = adapter.fns(ctx, state)
  assert gen is None


@pytest.mark.slow
def test_plan_compiles_the_edit_step():
  from horse_jax.plan import plan
  result = plan(WORLD, "ultraedit", 10, make_mesh(2, 4))
  stage = next(s for s in result["stages"] if s["name"] == "edit-step")
  assert stage["peak"] > 0 and result["info"]["batch_size"] == 1
