"""Package list for setuptools (the rest of the metadata is in pyproject.toml).

The model cards live in the top-level `models/` folder; pyproject maps it to the package
`horse_jax.cards` (package-dir) so a wheel installs them as package data. pyproject cannot add a
mapped package to `packages.find`, hence this list.
"""

from setuptools import find_packages, setup

setup(packages=find_packages(include=["horse_jax", "horse_jax.*"]) + ["horse_jax.cards"])
