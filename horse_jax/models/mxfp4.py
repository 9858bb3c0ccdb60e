"""MXFP4 weights (OCP microscaling FP4) as the public gpt-oss checkpoints store their experts.

A quantized weight `W` [..., rows, cols] is stored as two uint8 tensors:

  `<name>_blocks` [..., rows, cols // 32, 16]: FP4 e2m1 codes, two per byte; the low nibble is the
      even column, the high nibble the odd one (column 2j and 2j + 1 of a block of 32).
  `<name>_scales` [..., rows, cols // 32]: one e8m0 exponent per block of 32 columns (bias 127).

Value = e2m1(code) * 2 ** (scale - 127). gpt-oss stores each expert's projection as nn.Linear does
([out, in]); transformers dequantizes to its expert layout [E, in, out] by a final transpose of the
last two axes, which `dequantize_experts` does too. The product is formed in float32 (an exact power
of two times an exactly representable value) and rounded once to the requested dtype, which is what
transformers' `convert_moe_packed_tensors` does (`torch.ldexp` of the dtype's lookup table).
"""

from __future__ import annotations

import numpy as np

BLOCK = 32  # values per scale
# e2m1 codes 0..15: sign bit 3, exponent bits 2..1, mantissa bit 0.
E2M1 = np.asarray([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                   -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)
SCALE_BIAS = 127


def dequantize(blocks: np.ndarray, scales: np.ndarray, dtype=np.float32) -> np.ndarray:
  """Unpacks MXFP4 blocks to [..., G * 32] values, without any transpose.

  Args:
    blocks: uint8 [..., G, 16] packed e2m1 codes (low nibble first).
    scales: uint8 [..., G] e8m0 block exponents.
    dtype: output dtype (a NumPy dtype, e.g. np.float32 or ml_dtypes.bfloat16).

  Returns:
    [..., G * 32] values in `dtype`.

  Raises:
    ValueError: the shapes do not fit together.
  """
  blocks = np.asarray(blocks)
  scales = np.asarray(scales)
  if blocks.dtype != np.uint8 or scales.dtype != np.uint8:
    raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and "
                     f"{scales.dtype}")
  if blocks.shape[-1] != BLOCK // 2 or blocks.shape[:-1] != scales.shape:
    raise ValueError(f"MXFP4 blocks {list(blocks.shape)} do not fit scales {list(scales.shape)} "
                     f"(expected blocks = scales + [{BLOCK // 2}])")
  codes = np.empty(blocks.shape[:-1] + (BLOCK,), np.uint8)
  codes[..., 0::2] = blocks & 0x0F
  codes[..., 1::2] = blocks >> 4
  # 2 ** e in float32: e in [-127, 128]; 2 ** 128 overflows to inf as in transformers.
  with np.errstate(over="ignore"):
    factor = np.power(np.float32(2.0), scales.astype(np.float32) - np.float32(SCALE_BIAS))
  values = E2M1[codes] * factor[..., None]
  return values.reshape(blocks.shape[:-2] + (-1,)).astype(dtype)


def dequantize_experts(blocks: np.ndarray, scales: np.ndarray, dtype=np.float32) -> np.ndarray:
  """Expert weights [E, rows, cols] stored as MXFP4 -> transformers' layout [E, cols, rows].

  Args:
    blocks: uint8 [E, rows, cols // 32, 16].
    scales: uint8 [E, rows, cols // 32].
    dtype: output dtype.

  Returns:
    [E, cols, rows] (for gpt-oss `gate_up_proj`: [E, hidden, 2 * intermediate]; `down_proj`:
    [E, intermediate, hidden]), i.e. already [in, out] per expert.
  """
  blocks, scales = np.asarray(blocks), np.asarray(scales)
  e, rows, groups = scales.shape
  out = np.empty((e, groups * BLOCK, rows), dtype)
  for i in range(e):  # one expert at a time bounds the float32 temporaries
    out[i] = dequantize(blocks[i], scales[i], dtype).T
  return out


class PackedSlice:
  """A safetensors slice look-alike over a `<name>_blocks` / `<name>_scales` pair.

  `get_shape()` is the dequantized shape [E, cols, rows] and indexing with slices in that layout
  reads only the experts and rows asked for (a device's shard when loading onto a mesh), then
  dequantizes them to `dtype`.
  """

  def __init__(self, blocks_slice, scales_slice, dtype):
    self.blocks, self.scales, self.dtype = blocks_slice, scales_slice, dtype
    b_shape, s_shape = list(blocks_slice.get_shape()), list(scales_slice.get_shape())
    if len(b_shape) != 4 or b_shape[:-1] != s_shape or b_shape[-1] != BLOCK // 2:
      raise ValueError(f"MXFP4 blocks {b_shape} and scales {s_shape} do not fit "
                       f"([E, rows, G, {BLOCK // 2}] and [E, rows, G])")
    self.shape = [s_shape[0], s_shape[2] * BLOCK, s_shape[1]]

  def get_shape(self) -> list[int]:
    return list(self.shape)

  def __getitem__(self, index) -> np.ndarray:
    index = tuple(index) if isinstance(index, tuple) else (index,)
    experts, cols, rows = index + (slice(None),) * (3 - len(index))
    blocks = np.asarray(self.blocks[experts, rows])
    scales = np.asarray(self.scales[experts, rows])
    return dequantize_experts(blocks, scales, self.dtype)[:, cols, :]
