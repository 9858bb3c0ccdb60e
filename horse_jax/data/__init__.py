"""Edit requests, their tokenization, and dataset loaders."""

from horse_jax.data.records import EditRecord
from horse_jax.data.tokenize import EditBatch, bucket_length, tokenize_edit, tokenize_edits
from horse_jax.data.loaders import load_records
from horse_jax.data.unke import load_unke
