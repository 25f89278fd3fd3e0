import hashlib

import pytest

from fairseq_qasr.whisper import fetch as F


def _file(tmp_path, name, data: bytes):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_verify_accepts_exact_and_rejects_tampered(tmp_path):
    good = b"official whisper bytes" * 1000
    sha = hashlib.sha256(good).hexdigest()
    p = _file(tmp_path, "m.pt", good)
    assert F.verify(p, sha256=sha) == sha
    tampered = bytearray(good)
    tampered[123] ^= 1
    p.write_bytes(bytes(tampered))
    with pytest.raises(F.HashMismatch, match="differs from the published"):
        F.verify(p, sha256=sha)


def test_verify_uses_openai_hash_for_known_models(tmp_path):
    p = _file(tmp_path, "tiny.en.pt", b"not the checkpoint")
    with pytest.raises(F.HashMismatch, match="d3dd57d32accea0b295c96e26691aa14d8822fac7d9d27d5dc00b4ca2826dd03"):
        F.verify(p, "tiny.en")
    with pytest.raises(F.FetchError, match="unknown Whisper model"):
        F.verify(p, "tiny.xx")
    with pytest.raises(F.FetchError, match="no such file"):
        F.verify(tmp_path / "missing.pt", "tiny.en")


def test_fetch_never_uses_a_file_with_the_wrong_hash(tmp_path, monkeypatch):
    good = b"model" * 4096
    monkeypatch.setitem(F.SHA256, "fake", hashlib.sha256(good).hexdigest())
    bad = _file(tmp_path, "fake.pt", good[:-1] + b"X")
    out = tmp_path / "out"
    with pytest.raises(F.FetchError, match="could not obtain a verified"):
        F.fetch("fake", out, from_path=bad, use_url=False, use_wheels=False, cache_dirs=[out])
    assert not (out / "fake.pt").exists()
    # a tampered cached copy is skipped too, and the good local file is copied in
    (out / "fake.pt").write_bytes(b"tampered")
    src = tmp_path / "src"
    src.mkdir()
    (src / "fake.pt").write_bytes(good)
    path = F.fetch("fake", out, from_path=src, use_url=False, use_wheels=False, cache_dirs=[out])
    assert path == out / "fake.pt" and path.read_bytes() == good


def test_fetch_download_with_wrong_hash_is_deleted(tmp_path, monkeypatch):
    monkeypatch.setitem(F.SHA256, "fake", "0" * 64)

    def fake_download(url, dest, timeout):
        dest.write_bytes(b"evil")

    monkeypatch.setattr(F, "_download", fake_download)
    out = tmp_path / "out"
    with pytest.raises(F.FetchError):
        F.fetch("fake", out, use_wheels=False, cache_dirs=[])
    assert list(out.iterdir()) == []


def test_cached_tiny_en_is_official(whisper_ckpt):
    assert F.sha256_file(whisper_ckpt) == F.SHA256["tiny.en"]
