"""Data preparation and loading (plain python/torch/soundfile; no fairseq imports).

Kept import-light on purpose: import the submodules you need, e.g.
``from fairseq_qasr.data.manifest import read_manifest``.
"""
