"""Checkpoints load with weights_only=True: fairseq's classes are allowlisted, foreign objects are refused."""
from __future__ import annotations

import argparse
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import fairseq  # noqa: F401
import fairseq_qasr  # noqa: F401  (allowlists on import)
from fairseq import checkpoint_utils


class _RunsCode:
    """Unpickling this runs a shell command: what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _legacy_checkpoint(path: Path) -> None:
    """What fairseq pickles: legacy ``args``, an OmegaConf ``cfg``, and (when broadcasting a checkpoint to other
    ranks) placeholders for its tensors."""
    from fairseq.distributed.utils import _TensorPlaceholder

    torch.save({"args": argparse.Namespace(arch="qtransformer_conv_xs", lr=[0.1]),
                "cfg": OmegaConf.create({"model": {"_name": "qtransformer_conv_xs", "dims": [1, 2]}, "task": None}),
                "model": {"w": torch.ones(2)}, "broadcast": [_TensorPlaceholder(index=0)]}, path)


def test_legacy_checkpoint_with_namespace_and_omegaconf_loads_weights_only(tmp_path: Path):
    path = tmp_path / "legacy.pt"
    _legacy_checkpoint(path)
    state = torch.load(path)  # torch >= 2.6 default: weights_only=True, as in fairseq's checkpoint loader
    assert state["args"].arch == "qtransformer_conv_xs" and torch.equal(state["model"]["w"], torch.ones(2))
    # without the plugin's allowlist, torch's weights_only loader refuses the same file
    code = f"import torch; torch.load({str(path)!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0 and "Weights only load failed" in proc.stderr


def test_checkpoint_with_foreign_object_is_refused(tmp_path: Path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(1)}, "extra_state": _RunsCode(marker)}, path, pickle_protocol=2)
    with pytest.raises(pickle.UnpicklingError, match=r"GLOBAL (posix|os)\.system"):
        checkpoint_utils.load_checkpoint_to_cpu(str(path))
    assert not marker.exists(), "the checkpoint's code ran"


def test_every_allowlisted_class_is_needed(tmp_path: Path):
    """Exactly the classes fairseq checkpoints hold: dropping any one makes the legacy checkpoint unloadable."""
    path = tmp_path / "legacy.pt"
    _legacy_checkpoint(path)
    full = list(fairseq_qasr.checkpoint_safety.SAFE_GLOBALS)
    try:
        for cls in full:
            torch.serialization.clear_safe_globals()
            torch.serialization.add_safe_globals([c for c in full if c is not cls])
            with pytest.raises(pickle.UnpicklingError):
                torch.load(path, weights_only=True)
    finally:
        torch.serialization.clear_safe_globals()
        fairseq_qasr.checkpoint_safety.allow_fairseq_checkpoint_classes()
    torch.load(path, weights_only=True)
