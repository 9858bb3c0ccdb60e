"""Editors: hypernetwork editors (HORSE, MALMEN, MEND) and codebook editors (HoReN, GRACE).

Each editor is a package of pure functions over explicit state; import the one you need, e.g.
`from horse_jax.editors import hypernet`. `horse_jax.editors.protocol.make_editor` wraps any of the
five methods in one optax-style `Editor(init, edit, apply)`.
"""
