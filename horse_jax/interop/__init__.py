"""Editing models that live in other JAX libraries in place (`horse_jax.interop.nnx`: Flax NNX)."""
