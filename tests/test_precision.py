"""The editors' matrix products run at Precision.HIGHEST; the LM forward keeps the fast default.

XLA on CPU computes every float32 product in float32 whatever the precision says, so no numeric
test can see a bfloat16 pass (TPU) or TF32 (GPU). The check is on the lowered program instead: the
programs a run executes (the ones `horse_jax.plan` compiles: HORSE / MALMEN / MEND edit and
meta-training step, the memo's fill and step; HoReN / GRACE edit blocks, one-edit blocks, LoRA
entries; the edited model's logits and generation) are lowered on tiny shapes to StableHLO with
debug info, and every `stablehlo.dot_general` is classified by

  * its precision attribute (`precision = [HIGHEST, HIGHEST]` or not), and
  * the source line that wrote it: the innermost frame of its location (MLIR `callsite(callee at
    caller)` chains, callee first). Under `horse_jax/models/` it is the LM (forward, or its
    backward for the value gradients and dLoss/dS); under `horse_jax/editors/` it is the editor's
    own product (a retrieval score, a Hopfield softmax, a query, a normalizer statistic, the
    hypernetwork feeding the solve, a ridge gram / right-hand side, the meta-backward).

Rule: an LM product is not HIGHEST, an editor product is, and any other product fails the test (so a
new product has to be placed). Also every product whose op name carries the `exact` regions' named
scope (`horse_jax.editors.precision.SCOPE`) is HIGHEST and each editing program has such products,
which checks the mechanism the editors use. Both directions can fail: the negative controls lower
an undecorated retrieval (editor products at the default) and an LM forward inside an exact region
(LM products at HIGHEST) and require the checker to report them.
"""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from horse_jax import meshes
from horse_jax import plan as plan_lib
from horse_jax.editors import precision
from horse_jax.models import apply, config_to_hf
from horse_jax.models.init import random_model, tiny_llama_config

LOC_DEF = re.compile(r"^(#loc\d+) = (.*)$", re.M)


def dots(text: str) -> list[tuple[bool, str, str]]:
  """(HIGHEST?, innermost source file, op name) of every dot_general in StableHLO `text`."""
  locs = dict(LOC_DEF.findall(text))

  def resolve(loc: str, depth: int = 0) -> tuple[str, str]:
    """(innermost file, outermost op name) of a location (an alias #locN or an inline loc(...))."""
    if depth > 200:
      return "?", ""
    loc = locs.get(loc, loc)
    body = loc[4:-1] if loc.startswith("loc(") else loc
    if body.startswith("callsite("):
      return resolve(re.match(r"callsite\((#loc\d+|loc\(.*?\)) at", body).group(1), depth + 1)
    file_loc = re.match(r'"([^"]*)":\d+', body)
    if file_loc:
      return file_loc.group(1), ""
    named = re.match(r'"([^"]*)"\((.*)\)$', body)
    if named:
      return resolve(named.group(2), depth + 1)[0], named.group(1)
    inner = re.search(r"#loc\d+", body)
    return (resolve(inner.group(0), depth + 1)[0], "") if inner else ("?", "")

  out = []
  for line in text.splitlines():
    if "stablehlo.dot_general" not in line:
      continue
    prec = re.search(r"precision = \[(\w+), (\w+)\]", line)
    loc = re.search(r"loc\((#loc\d+)\)\s*$", line)
    file, name = resolve(loc.group(1)) if loc else ("?", "")
    out.append((bool(prec) and prec.groups() == ("HIGHEST", "HIGHEST"), file, name))
  return out


def violations(text: str) -> tuple[list[str], dict[str, int]]:
  """(products breaking the rule, counts {"lm", "editor", "scoped"})."""
  bad, counts = [], {"lm": 0, "editor": 0, "scoped": 0}
  for highest, file, name in dots(text):
    where = file.replace("\\", "/")
    # a path component of the op name, maybe inside a transformation: vmap(exact_f32), transpose(...)
    scoped = re.search(rf"(^|[/(]){precision.SCOPE}($|[/)])", name) is not None
    counts["scoped"] += scoped
    if "/horse_jax/models/" in where:
      counts["lm"] += 1
      if highest:
        bad.append(f"LM product at HIGHEST: {where} {name}")
    elif "/horse_jax/editors/" in where:
      counts["editor"] += 1
      if not highest:
        bad.append(f"editor product at the default precision: {where} {name}")
    else:
      bad.append(f"product of neither the LM nor an editor: {where} {name} (highest={highest})")
    if scoped and not highest:
      bad.append(f"product in an exact region at the default precision: {where} {name}")
  return bad, counts


class _Lowered:
  """What `plan._measure` reads from a compiled program (nothing: the text is what is tested)."""

  def memory_analysis(self):
    return None

  def cost_analysis(self):
    return {}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp("precision") / "tiny-llama"
  folder.mkdir()
  folder.joinpath("config.json").write_text(json.dumps(config_to_hf(tiny_llama_config(num_layers=2))))
  return folder


def planned_programs(folder, method, mesh="1x1", overrides=()) -> dict[str, str]:
  """{program name: StableHLO text} of the programs `plan` compiles for `method` (lowered only)."""
  texts = {}

  def lower(fn, *args, **kwargs):
    texts[fn.__name__] = fn.lower(*args, **kwargs).as_text(debug_info=True)
    return _Lowered()

  real = plan_lib._compile
  plan_lib._compile = lower
  try:
    plan_lib.plan(str(folder), method, 8, meshes.planning_mesh(mesh), overrides=list(overrides))
  finally:
    plan_lib._compile = real
  return texts


def assert_rule(texts: dict[str, str], editor_programs):
  for name, text in texts.items():
    bad, counts = violations(text)
    assert not bad, (name, bad[:5], len(bad))
    assert counts["lm"] > 0, name  # every program runs the LM somewhere
    if name in editor_programs:
      assert counts["editor"] > 0 and counts["scoped"] > 0, (name, counts)


@pytest.mark.parametrize("method,mesh", [("horse", "1x1"), ("horse", "2x4"), ("malmen", "1x1"),
                                         ("mend", "1x1")])
def test_hypernet_programs(folder, method, mesh):
  texts = planned_programs(folder, method, mesh, ["editor.rank=8"])
  assert set(texts) == {"edit_program", "train_program", "fill_memo_program", "train_program_memo"}
  # The memo's fill is the LM alone (keys and value gradients); the others solve.
  assert_rule(texts, {"edit_program", "train_program", "train_program_memo"})


@pytest.mark.parametrize("method,overrides", [
    ("horen", ()), ("horen", ("editor.edit_block=1",)), ("horen", ("editor.adapter_mode=lora",)),
    ("grace", ())])
def test_codebook_edit_programs(folder, method, overrides):
  texts = planned_programs(folder, method, "1x1", overrides)
  assert set(texts) == {"_edit_block_jit", "_edited_logits"}  # the edit block and the inference stage
  assert_rule(texts, texts)


@pytest.mark.parametrize("method,mode", [("horen", "value"), ("horen", "lora"), ("grace", "value")])
def test_codebook_inference_programs(method, mode):
  from horse_jax.editors.codebook import infer, state
  from horse_jax.editors.codebook.settings import CodebookSettings, hyper_of, jit_key
  model = random_model(tiny_llama_config(num_layers=2), seed=0)
  st = CodebookSettings(method=method, layer="model.layers.1.mlp.down_proj", adapter_mode=mode,
                        initial_capacity=8, normalize_codebook_keys=method == "horen")
  book = state.init(st, 128, 64)
  ids = jnp.ones((2, 6), jnp.int32)
  texts = {
      "logits": infer._edited_logits.lower(model, book, ids, ids, jnp.full((2,), 4, jnp.int32),
                                           hyper_of(st), settings=jit_key(st)).as_text(debug_info=True),
      "generate": infer._edited_generate.lower(model, book, ids, ids, hyper_of(st), settings=jit_key(st),
                                               max_new_tokens=2).as_text(debug_info=True)}
  assert_rule(texts, texts)


def test_the_check_fails_both_ways():
  """An undecorated editor function (editor products at the default) and an LM forward inside an
  exact region (LM products at HIGHEST) are both reported. (The hypernetwork's blocks write plain
  `@` products and rely on their `exact` decorator, so without it they are at the default.)"""
  from horse_jax.editors.hypernet import network
  blocks = network.init_net(jax.random.PRNGKey(0), width=16, rank=4, n_modules=1, n_blocks=2,
                            lr=1e-4)["blocks"]
  h = jnp.ones((8, 16))
  plain = jax.jit(lambda b, h: network.apply_blocks.__wrapped__(b, h, 0))
  bad, counts = violations(plain.lower(blocks, h).as_text(debug_info=True))
  assert counts["editor"] >= 2 and len(bad) == counts["editor"], bad
  assert all("editor product at the default precision" in b for b in bad)
  exact = jax.jit(lambda b, h: network.apply_blocks(b, h, 0))
  assert violations(exact.lower(blocks, h).as_text(debug_info=True))[0] == []

  model = random_model(tiny_llama_config(num_layers=1), seed=0)
  ids = np.ones((1, 4), np.int32)
  bad, counts = violations(jax.jit(apply).lower(model, ids).as_text(debug_info=True))
  assert bad == [] and counts["lm"] > 0

  @jax.jit
  def precise_forward(model, ids):
    with precision.exact_region():
      return apply(model, ids)

  bad, counts = violations(precise_forward.lower(model, ids).as_text(debug_info=True))
  assert len(bad) >= counts["lm"] > 0 and all(b.startswith("LM product at HIGHEST") for b in bad)
