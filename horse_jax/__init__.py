"""horse-jax: knowledge editing for large language models in JAX.

Editors: HORSE, MALMEN, MEND (hypernetwork + closed-form solve) and HoReN, GRACE (codebooks).
"""

__version__ = "0.1.0"
