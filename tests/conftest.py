"""Shared pytest fixtures.

Data fixtures (real audio from the bundled LibriSpeech sample, data/sample/LibriSpeech):
- ``repo_root``: the repository root (Path).
- ``sample_root``: the bundled sample's LibriSpeech root (Path).
- ``prepared_sample``: session-wide; the sample's SAMPLE_SPLITS prepared once (manifests,
  spm.model, dict.txt, config.yaml) into a temp dir (Path). Treat it as read-only.
- ``tiny_root``: per-test writable LibriSpeech root holding a copy of the sample's dev-clean
  (8 utterances), for tests that damage data.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_ROOT = REPO_ROOT / "data" / "sample" / "LibriSpeech"
# train-clean-100 is audio-only in the sample (unlabeled utterances).
SAMPLE_SPLITS = ("train-clean-5", "dev-clean", "test-clean", "train-clean-100")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def sample_root() -> Path:
    if not SAMPLE_ROOT.is_dir():
        pytest.fail(f"bundled sample missing: {SAMPLE_ROOT} (see data/sample/README.md)")
    return SAMPLE_ROOT


@pytest.fixture(scope="session")
def prepared_sample(sample_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fairseq_qasr.data.prepare import prepare_librispeech

    out = tmp_path_factory.mktemp("prepared_sample")
    prepare_librispeech(sample_root, out, SAMPLE_SPLITS, progress=False)
    return out


@pytest.fixture
def tiny_root(sample_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "LibriSpeech"
    shutil.copytree(sample_root / "dev-clean", root / "dev-clean")
    return root
