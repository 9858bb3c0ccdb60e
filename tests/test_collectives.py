"""`horse_jax.collectives`: collectives read from compiled HLO text, with byte counts by hand.

Hand-written HLO modules cover every counted form (plain, `-start`/`-done`, `async-start` wrapping
a collective), combined (tuple) operands, dtypes of 1, 2 and 4 bytes, and loops with and without a
recorded trip count; one real program compiled for 8 forced CPU devices (a subprocess) checks the
parser on XLA's own output.
"""

import json
import os
import subprocess
import sys
import textwrap

from horse_jax.collectives import collectives, type_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PLAIN = """\
HloModule jit_f, entry_computation_layout={(f32[8,16]{1,0})->f32[8,16]{1,0}}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

ENTRY %main.1_spmd (param: f32[8,16], param.1: bf16[4,32], param.2: s8[64]) -> f32[8,16] {
  %param = f32[8,16]{1,0} parameter(0), sharding={devices=[2,4]<=[8]}
  %param.1 = bf16[4,32]{1,0} parameter(1)
  %param.2 = s8[64]{0} parameter(2)
  %all-reduce = f32[8,16]{1,0} all-reduce(%param), channel_id=1, replica_groups=[2,4]<=[8], use_global_device_ids=true, to_apply=%add
  %all-gather = bf16[16,32]{1,0} all-gather(%param.1), channel_id=2, replica_groups=[2,4]<=[8], dimensions={0}
  %reduce-scatter = f32[2,16]{1,0} reduce-scatter(%all-reduce), channel_id=3, replica_groups=[2,4]<=[8], dimensions={0}, to_apply=%add
  %all-to-all = s8[64]{0} all-to-all(%param.2), channel_id=4, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}
  %collective-permute = f32[8,16]{1,0} collective-permute(%param), channel_id=5, source_target_pairs={{0,1},{1,0}}
  %combined = (f32[8,16]{1,0}, bf16[4,32]{1,0}) all-reduce(%param, %param.1), channel_id=6, replica_groups=[2,4]<=[8], to_apply=%add
  ROOT %out = f32[8,16]{1,0} add(%collective-permute, %all-reduce)
}
"""


def test_type_bytes():
  assert type_bytes("f32[8,16]{1,0}") == 8 * 16 * 4
  assert type_bytes("bf16[4,32]{1,0:T(8,128)(2,1)}") == 4 * 32 * 2
  assert type_bytes("(f32[8]{0}, s8[3]{0}, pred[])") == 32 + 3 + 1
  assert type_bytes("s4[3]{0}") == 2  # 12 bits, rounded up to whole bytes
  assert type_bytes("f32[<=8,4]") == 128  # a bounded dynamic dimension counts its bound


def test_plain_collectives_by_hand():
  s = collectives(PLAIN)
  got = {op.name: (op.kind, op.shape, op.bytes, op.count) for op in s.ops}
  assert got == {
      "all-reduce": ("all-reduce", "f32[8,16]", 512, 1),
      "all-gather": ("all-gather", "bf16[16,32]", 1024, 1),  # the gathered output (input 256)
      "reduce-scatter": ("reduce-scatter", "f32[2,16]", 512, 1),  # the input (output 128)
      "all-to-all": ("all-to-all", "s8[64]", 64, 1),
      "collective-permute": ("collective-permute", "f32[8,16]", 512, 1),
      "combined": ("all-reduce", "(f32[8,16], bf16[4,32])", 512 + 256, 1),
  }
  assert s.total_bytes == 512 + 1024 + 512 + 64 + 512 + 768
  assert s.largest.name == "all-gather" and s.unknown_trip_loops == 0
  assert s.by_kind() == {"all-reduce": 512 + 768, "all-gather": 1024, "reduce-scatter": 512,
                         "collective-permute": 512, "all-to-all": 64}
  heavy = s.heaviest(2)
  assert [(g["kind"], g["shape"], g["total_bytes"]) for g in heavy] == [
      ("all-gather", "bf16[16,32]", 1024), ("all-reduce", "(f32[8,16], bf16[4,32])", 768)]


ASYNC = """\
HloModule jit_g

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%rs_wrapped (p: f32[64,8]) -> f32[16,8] {
  %p = f32[64,8]{1,0} parameter(0)
  ROOT %rs = f32[16,8]{1,0} reduce-scatter(%p), channel_id=9, replica_groups={{0,1,2,3}}, dimensions={0}, to_apply=%add
}

ENTRY %main (x: f32[64,8], y: bf16[128]) -> f32[16,8] {
  %x = f32[64,8]{1,0} parameter(0)
  %y = bf16[128]{0} parameter(1)
  %ar-start = f32[64,8]{1,0} all-reduce-start(%x), channel_id=1, replica_groups={{0,1,2,3}}, to_apply=%add
  %ar-done = f32[64,8]{1,0} all-reduce-done(%ar-start)
  %ag-start = (bf16[128]{0}, bf16[512]{0}) all-gather-start(%y), channel_id=2, replica_groups={{0,1,2,3}}, dimensions={0}
  %ag-done = bf16[512]{0} all-gather-done(%ag-start)
  %cp-start = (f32[64,8]{1,0}, f32[64,8]{1,0}, u32[], u32[]) collective-permute-start(%ar-done), channel_id=3, source_target_pairs={{0,1},{1,2},{2,3},{3,0}}
  %cp-done = f32[64,8]{1,0} collective-permute-done(%cp-start)
  %async-start = ((f32[64,8]{1,0}), f32[16,8]{1,0}, s32[]) async-start(%cp-done), calls=%rs_wrapped
  ROOT %async-done = f32[16,8]{1,0} async-done(%async-start)
}
"""


def test_async_pairs_count_once():
  s = collectives(ASYNC)
  got = [(op.kind, op.shape, op.bytes) for op in s.ops]
  # The wrapped reduce-scatter is counted at its async-start only (its computation is not visited).
  assert sorted(got) == sorted([
      ("all-reduce", "f32[64,8]", 2048),
      ("all-gather", "bf16[512]", 1024),  # the done's output, not the start's (operand, output) tuple
      ("collective-permute", "f32[64,8]", 2048),  # not the context scalars of the start
      ("reduce-scatter", "f32[16,8]", 2048),  # input f32[64,8] of 2048 bytes, output 512
  ])
  assert s.total_bytes == 2048 * 3 + 1024 and len(s.ops) == 4


LOOPS = """\
HloModule jit_h

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%inner_body (t: (s32[], f32[32])) -> (s32[], f32[32]) {
  %t = (s32[], f32[32]{0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %v = f32[32]{0} get-tuple-element(%t), index=1
  %ar.inner = f32[32]{0} all-reduce(%v), channel_id=2, replica_groups={{0,1}}, to_apply=%add
  ROOT %r = (s32[], f32[32]{0}) tuple(%i, %ar.inner)
}

%inner_cond (t: (s32[], f32[32])) -> pred[] {
  %t = (s32[], f32[32]{0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

%outer_body (t: (s32[], f32[32])) -> (s32[], f32[32]) {
  %t = (s32[], f32[32]{0}) parameter(0)
  %v = f32[32]{0} get-tuple-element(%t), index=1
  %ag.outer = f32[64]{0} all-gather(%v), channel_id=1, replica_groups={{0,1}}, dimensions={0}
  %w = (s32[], f32[32]{0}) while(%t), condition=%inner_cond, body=%inner_body
  ROOT %r = (s32[], f32[32]{0}) tuple(%w)
}

%outer_cond (t: (s32[], f32[32])) -> pred[] {
  %t = (s32[], f32[32]{0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (x: f32[32]) -> (s32[], f32[32]) {
  %x = f32[32]{0} parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], f32[32]{0}) tuple(%zero, %x)
  ROOT %loop = (s32[], f32[32]{0}) while(%init), condition=%outer_cond, body=%outer_body, backend_config={"known_trip_count":{"n":"6"}}
}
"""


def test_loops_multiply_by_known_trip_counts():
  s = collectives(LOOPS)
  ops = {op.name: op for op in s.ops}
  assert ops["ag.outer"].count == 6 and ops["ag.outer"].bytes == 256
  # Grouped by (kind, shape), heaviest first: 6 x 256 before 6 x 128.
  assert [(g["kind"], g["count"], g["total_bytes"]) for g in s.heaviest()] == [
      ("all-gather", 6, 6 * 256), ("all-reduce", 6, 6 * 128)]
  # The inner loop has no recorded trip count: once per outer iteration, and reported.
  assert ops["ar.inner"].count == 6 and ops["ar.inner"].bytes == 128
  assert s.unknown_trip_loops == 1
  assert s.total_bytes == 6 * 256 + 6 * 128
  assert s.largest.name == "ag.outer"


def test_no_collectives():
  s = collectives("HloModule m\n\nENTRY %main (x: f32[4]) -> f32[4] {\n"
                  "  ROOT %x = f32[4]{0} parameter(0)\n}\n")
  assert s.ops == () and s.total_bytes == 0 and s.largest is None


REAL = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from horse_jax.collectives import collectives
    from horse_jax.models import make_mesh
    mesh = make_mesh(1, 8)
    # x [16, 64] @ w [64, 32], the contraction split over `model`, the product replicated: one
    # all-reduce of the [16, 32] float32 partial products (2048 bytes per device).
    x = jax.ShapeDtypeStruct((16, 64), jnp.float32, sharding=NamedSharding(mesh, P(None, "model")))
    w = jax.ShapeDtypeStruct((64, 32), jnp.float32, sharding=NamedSharding(mesh, P("model", None)))
    out = NamedSharding(mesh, P())
    matmul = jax.jit(lambda x, w: x @ w, out_shardings=out).lower(x, w).compile()
    # psum of each device's [1, 32] row inside a 5-step scan: 5 all-reduces of 128 bytes.
    def steps(v):
      return jax.lax.scan(lambda c, _: (c + jax.lax.psum(c, "model"), None), v, None, length=5)[0]
    f = jax.shard_map(steps, mesh=mesh, in_specs=P("model"), out_specs=P("model"))
    v = jax.ShapeDtypeStruct((8, 32), jnp.float32, sharding=NamedSharding(mesh, P("model")))
    loop = jax.jit(f).lower(v).compile()
    print(json.dumps([collectives(c.as_text()).to_dict() for c in (matmul, loop)]))
""")


def test_real_program_on_8_forced_cpu_devices():
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="8", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", REAL], capture_output=True, text=True, env=env,
                        cwd=ROOT, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  matmul, loop = json.loads(proc.stdout.strip().splitlines()[-1])
  assert matmul["n_ops"] == 1 and matmul["total_bytes"] == 2048
  assert matmul["largest"]["kind"] == "all-reduce" and matmul["largest"]["shape"] == "f32[16,32]"
  assert loop["largest"]["kind"] == "all-reduce" and loop["largest"]["bytes"] == 128
  assert loop["total_bytes"] == 5 * 128 and loop["unknown_trip_loops"] == 0
