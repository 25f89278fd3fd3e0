"""TSV manifests (id, audio, n_frames, tgt_text, speaker) and atomic file writes."""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Iterable

from .errors import DataError

MANIFEST_COLUMNS = ("id", "audio", "n_frames", "tgt_text", "speaker")

__all__ = [
    "MANIFEST_COLUMNS",
    "ManifestRow",
    "read_manifest",
    "write_manifest",
    "atomic_write_bytes",
    "atomic_write_text",
]


@dataclass(frozen=True)
class ManifestRow:
    """One utterance. ``audio`` is a path (absolute once read back); ``line`` is its manifest line."""

    id: str
    audio: str
    n_frames: int
    tgt_text: str
    speaker: str
    line: int = 0

    @property
    def labeled(self) -> bool:
        """False for an audio-only utterance (empty target text)."""
        return self.tgt_text != ""


def atomic_write_bytes(path: str | os.PathLike, data: bytes, only_if_changed: bool = False) -> bool:
    """Write ``data`` to ``path`` via a temp file in the same directory + ``os.replace``.

    With ``only_if_changed``, an existing file with identical bytes is left untouched (mtime kept).
    Returns True when the file was written.
    """
    path = os.fspath(path)
    if only_if_changed and os.path.isfile(path):
        with open(path, "rb") as f:
            if f.read() == data:
                return False
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return True


def atomic_write_text(path: str | os.PathLike, text: str, only_if_changed: bool = False) -> bool:
    """UTF-8, ``\\n`` line endings version of :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"), only_if_changed=only_if_changed)


def _columns_msg(n: int) -> str:
    return f"expected {len(MANIFEST_COLUMNS)} tab-separated columns ({', '.join(MANIFEST_COLUMNS)}), got {n}"


def read_manifest(path: str | os.PathLike) -> list[ManifestRow]:
    """Read and validate a manifest; relative audio paths resolve against the manifest's directory.

    The header must start with exactly MANIFEST_COLUMNS (extra trailing columns are ignored, in
    the header and in rows). Empty lines are skipped. Raises ``DataError("<path>:<line>: ...")``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"manifest not found: {path}")
    base = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, encoding="utf-8", newline="") as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 text ({err})") from None
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in lines]
    if not lines or lines[0] == "":
        raise DataError(f"{path}:1: empty manifest, expected the header line {chr(9).join(MANIFEST_COLUMNS)!r}")
    header = lines[0].split("\t")
    if tuple(header[: len(MANIFEST_COLUMNS)]) != MANIFEST_COLUMNS:
        raise DataError(
            f"{path}:1: bad header {lines[0]!r}, expected tab-separated columns {', '.join(MANIFEST_COLUMNS)}"
        )
    rows: list[ManifestRow] = []
    first_line: dict[str, int] = {}
    for lineno, text in enumerate(lines[1:], start=2):
        if text == "":
            continue
        fields = text.split("\t")
        if len(fields) < len(MANIFEST_COLUMNS):
            raise DataError(f"{path}:{lineno}: {_columns_msg(len(fields))}")
        uid, audio, n_frames, tgt_text, speaker = fields[: len(MANIFEST_COLUMNS)]
        if uid == "":
            raise DataError(f"{path}:{lineno}: empty id")
        if audio == "":
            raise DataError(f"{path}:{lineno}: empty audio path for utterance {uid}")
        try:
            frames = int(n_frames)
        except ValueError:
            frames = -1
        if frames < 0:
            raise DataError(f"{path}:{lineno}: n_frames must be an integer >= 0, got {n_frames!r}")
        if uid in first_line:
            raise DataError(f"{path}:{lineno}: duplicate utterance id {uid} (first on line {first_line[uid]})")
        first_line[uid] = lineno
        if not os.path.isabs(audio):
            audio = os.path.normpath(os.path.join(base, audio))
        rows.append(ManifestRow(uid, audio, frames, tgt_text, speaker, lineno))
    return rows


def write_manifest(path: str | os.PathLike, rows: Iterable[ManifestRow], only_if_changed: bool = False) -> bool:
    """Write rows (header first) atomically. Fields may not contain tabs or newlines."""
    path = os.fspath(path)
    out = ["\t".join(MANIFEST_COLUMNS)]
    for r in rows:
        fields = [str(r.id), str(r.audio), str(int(r.n_frames)), str(r.tgt_text), str(r.speaker)]
        for name, value in zip(MANIFEST_COLUMNS, fields):
            if any(c in value for c in "\t\r\n"):
                raise DataError(f"{path}: utterance {r.id}: {name} contains a tab or newline: {value!r}")
        out.append("\t".join(fields))
    return atomic_write_text(path, "\n".join(out) + "\n", only_if_changed=only_if_changed)
