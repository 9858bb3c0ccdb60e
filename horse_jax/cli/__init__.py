"""The `horse-jax` command line."""
