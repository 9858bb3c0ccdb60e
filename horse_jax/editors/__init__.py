"""Editors: hypernetwork editors (HORSE, MALMEN, MEND) and codebook editors (HoReN, GRACE).

Each editor is a package of pure functions over explicit state; import the one you need, e.g.
`from horse_jax.editors import hypernet`.
"""
