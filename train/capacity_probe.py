"""Two diagnostics for "why is HORSE's edit success at N edits what it is" (train/README.md).

`finetune`: how much the edited weights can hold. Adam directly on the shifts of the same modules
HORSE edits, full batch, loss = token-mean CE on the N edit prompts' new targets + `--loc-coef` x CE
of the locality prompts' gold answers, then the usual teacher-forced scores. No hypernetwork and no
closed-form solve: an upper reference for what one shift per module can do, not an editor (it
sees the scored locality prompts, so its locality is optimistic; its ES is not).

`widen`: a function-preserving copy of a llama with E more neurons in every MLP. The new gate/up
columns are random (normal, with the std of the trained columns) and the new down_proj rows are
zero, so every logit is unchanged, but the down_proj keys gain E random non-linear features of the
residual stream: HORSE's edit capacity with wider keys, everything else equal.

  python train/capacity_probe.py finetune checkpoints/world/model \
      checkpoints/world/data/zsre_test.json --n-edits 1000 --steps 100
  python train/capacity_probe.py widen checkpoints/world/model /tmp/wide --extra 2304
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax


@functools.partial(jax.jit, static_argnames=("low",))
def shift_ce_grad(model, shifts: dict, input_ids, attention_mask, labels, low: int):
  """Token-mean CE of one mini-batch of the model with `shifts` added, and its gradient w.r.t. them
  (`low`: the lowest edited layer; the stream below it does not depend on the shifts)."""
  from horse_jax.editors.codebook.edit import token_ce
  from horse_jax.models import Model, forward_from, hidden_before
  from horse_jax.models.names import add_to_kernels

  h = hidden_before(model, low, input_ids, attention_mask)

  def loss_fn(s):
    edited = Model(add_to_kernels(model.params, s), model.config)
    return token_ce(forward_from(edited, low, h, attention_mask).logits, labels)

  return jax.value_and_grad(loss_fn)(shifts)


def finetune_shifts(model, tokenizer, records, modules, steps: int, lr: float, loc_coef: float,
                    lm_batch: int = 250, log=print) -> dict:
  """Adam on {module: shift [d_k, d_v]} from zero; returns the shifts.

  Args:
    model: the LM.
    tokenizer: its tokenizer.
    records: EditRecords with loc_prompt/loc_answer.
    modules: edited kernel names (e.g. model.layers.3.mlp.down_proj).
    steps: full-batch Adam steps.
    lr: Adam learning rate.
    loc_coef: weight of the locality CE.
    lm_batch: LM mini-batch (gradients are summed over mini-batches).
    log: progress lines.
  """
  from horse_jax.editors import hypernet
  from horse_jax.models.names import layer_index

  shapes = hypernet.module_shapes(model.params, modules)
  shifts = {m: jnp.zeros(s, jnp.float32) for m, s in zip(modules, shapes)}
  edit_b = hypernet.edit_batches(tokenizer, records, lm_batch)
  loc_b = hypernet.loc_batches(tokenizer, records, lm_batch)
  low = min(layer_index(m) for m in modules)
  opt = optax.adam(lr)
  state = opt.init(shifts)
  t0 = time.time()
  for step in range(steps):
    total = jax.tree.map(jnp.zeros_like, shifts)
    losses = []
    for batches, coef in ((edit_b, 1.0), (loc_b, loc_coef)):
      acc = 0.0
      for b in batches:
        loss, g = shift_ce_grad(model, shifts, b.input_ids, b.attention_mask, b.labels, low)
        total = jax.tree.map(lambda a, x: a + coef * x, total, g)
        acc += float(loss)
      losses.append(acc / len(batches))
    updates, state = opt.update(total, state)
    shifts = optax.apply_updates(shifts, updates)
    if step % 20 == 0 or step == steps - 1:
      log(f"step {step}: edit CE {losses[0]:.3f}, locality CE {losses[1]:.3f} ({time.time() - t0:.0f}s)")
  return shifts


def widen_mlp(model, extra: int, seed: int = 0):
  """A copy of a llama-family `model` with `extra` more MLP neurons per layer, same function."""
  from horse_jax.models import Model

  rng = np.random.default_rng(seed)
  layers = {}
  for name, layer in model.params["model"]["layers"].items():
    mlp = layer["mlp"]
    gate, up, down = (np.asarray(mlp[k]["kernel"]) for k in ("gate_proj", "up_proj", "down_proj"))
    d_model = gate.shape[0]
    new = {
        "gate_proj": np.concatenate([gate, rng.normal(0, gate.std(), (d_model, extra))], 1),
        "up_proj": np.concatenate([up, rng.normal(0, up.std(), (d_model, extra))], 1),
        # Zero output rows: the new neurons fire but write nothing, so logits are unchanged.
        "down_proj": np.concatenate([down, np.zeros((extra, down.shape[1]))], 0),
    }
    layers[name] = {**layer, "mlp": {k: {"kernel": jnp.asarray(v, gate.dtype)} for k, v in new.items()}}
  params = {**model.params, "model": {**model.params["model"], "layers": layers}}
  cfg = model.config
  width = cfg.intermediate_size + extra
  hf = json.loads(cfg.hf_config_json) if cfg.hf_config_json else None
  if hf is not None:
    hf["intermediate_size"] = width
  config = dataclasses.replace(cfg, intermediate_size=width,
                               hf_config_json=json.dumps(hf, sort_keys=True) if hf else cfg.hf_config_json)
  return Model(params, config)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="cmd", required=True)
  f = sub.add_parser("finetune", help="Adam on the edited modules' shifts (capacity reference)")
  f.add_argument("model")
  f.add_argument("data")
  f.add_argument("--n-edits", type=int, default=1000)
  f.add_argument("--steps", type=int, default=100)
  f.add_argument("--lr", type=float, default=1e-3)
  f.add_argument("--loc-coef", type=float, default=1.0)
  f.add_argument("--layers", default="0,1,2,3", help="down_proj layers to edit")
  f.add_argument("--out", default=None, help="write the summary JSON here")
  w = sub.add_parser("widen", help="function-preserving wider-MLP copy of a llama")
  w.add_argument("model")
  w.add_argument("out")
  w.add_argument("--extra", type=int, required=True, help="neurons added to every MLP")
  args = p.parse_args(argv)

  from horse_jax.runtime import load_model, logits_fn
  model, tok = load_model(args.model)
  if args.cmd == "widen":
    from horse_jax.models import save_pretrained
    save_pretrained(widen_mlp(model, args.extra), args.out, tokenizer_src=args.model)
    print(f"{args.out}: intermediate_size {model.config.intermediate_size + args.extra}")
    return 0

  from horse_jax.data.loaders import load_records
  from horse_jax.editors import hypernet
  from horse_jax.eval.scoring import score_records
  from horse_jax.io import atomic_write_json
  records = load_records(args.data, limit=args.n_edits)
  modules = [f"model.layers.{i}.mlp.down_proj" for i in args.layers.split(",")]
  shifts = finetune_shifts(model, tok, records, modules, args.steps, args.lr, args.loc_coef)
  summary = score_records(records, tok, logits_fn(hypernet.apply(model, shifts)), logits_fn(model),
                          max_length=128, progress=False)["summary"]
  print(json.dumps({k: round(v, 4) for k, v in summary.items() if isinstance(v, float)}))
  if args.out:
    atomic_write_json(args.out, summary)
  return 0


if __name__ == "__main__":
  sys.exit(main())
