"""Every bad input gives its documented DataError message (real audio, no mocks)."""
from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from fairseq_qasr.data.audio import audio_info, read_audio
from fairseq_qasr.data.errors import DataError
from fairseq_qasr.data.manifest import ManifestRow, read_manifest, write_manifest
from fairseq_qasr.data.prepare import prepare_librispeech

REPO_ROOT = Path(__file__).resolve().parent.parent
UTT = "251-137823-0002"  # in the sample's dev-clean, chapter 251/137823 (two utterances)


def flac(root: Path, uid: str = UTT) -> Path:
    speaker, chapter, _ = uid.split("-")
    return root / "dev-clean" / speaker / chapter / f"{uid}.flac"


def trans(root: Path, uid: str = UTT) -> Path:
    speaker, chapter, _ = uid.split("-")
    return root / "dev-clean" / speaker / chapter / f"{speaker}-{chapter}.trans.txt"


def prepare(root: Path, out: Path, **kw):
    return prepare_librispeech(root, out, ["dev-clean"], spm_train_splits=["dev-clean"], progress=False, **kw)


def raises(fn, *args, **kw) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kw)
    return str(info.value)


# --- audio -------------------------------------------------------------------------------------


def test_missing_audio_file(tiny_root: Path, tmp_path: Path) -> None:
    path = flac(tiny_root)
    path.unlink()
    assert raises(audio_info, path) == f"audio file not found: {path}"
    assert raises(read_audio, path, where="x.tsv:3") == f"x.tsv:3: audio file not found: {path}"
    # A transcript line whose audio is missing names both files.
    msg = raises(prepare, tiny_root, tmp_path / "out")
    line = 1 + [ln.split(" ")[0] for ln in trans(tiny_root).read_text().splitlines()].index(UTT)
    assert msg == f"{trans(tiny_root)}:{line}: transcript for utterance {UTT} but its audio file {path} is missing"


def test_garbage_flac(tiny_root: Path, tmp_path: Path) -> None:
    path = flac(tiny_root)
    path.write_bytes(random.Random(0).randbytes(5000))
    for msg in (raises(audio_info, path), raises(read_audio, path), raises(prepare, tiny_root, tmp_path / "out")):
        assert msg.startswith(f"cannot decode audio file {path} (corrupt or truncated?): ")


@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_truncated_flac(tiny_root: Path, tmp_path: Path, keep: float) -> None:
    path = flac(tiny_root)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    assert sf.info(str(path)).frames > 0  # the header alone looks fine
    for msg in (raises(audio_info, path), raises(read_audio, path), raises(prepare, tiny_root, tmp_path / "out")):
        assert msg.startswith(f"cannot decode audio file {path} (corrupt or truncated?): ")


def test_8khz_audio(tiny_root: Path, tmp_path: Path) -> None:
    path = flac(tiny_root)
    n16 = sf.info(str(path)).frames
    wav8k = read_audio(path, sample_rate=8000, resample=True)
    assert wav8k.numel() == (n16 + 1) // 2
    sf.write(str(path), wav8k.numpy(), 8000, format="FLAC", subtype="PCM_16")
    expected = f"{path} is 8000 Hz, expected 16000 Hz; pass --resample-audio to resample"
    assert raises(read_audio, path) == expected
    assert raises(read_audio, path, where="d/test.tsv:4") == f"d/test.tsv:4: {expected}"
    assert raises(prepare, tiny_root, tmp_path / "out") == expected
    # With resampling allowed it is accepted; n_frames counts 10-ms frames at 16 kHz.
    prepare(tiny_root, tmp_path / "out", resample_audio=True)
    row = {r.id: r for r in read_manifest(tmp_path / "out" / "dev-clean.tsv")}[UTT]
    wav16 = read_audio(row.audio, resample=True)
    assert row.n_frames == wav16.numel() // 160 == (2 * wav8k.numel()) // 160


def test_empty_audio(tmp_path: Path) -> None:
    path = tmp_path / "empty.wav"
    sf.write(str(path), [], 16000, format="WAV", subtype="PCM_16")
    assert raises(audio_info, path) == f"audio file is empty (0 samples): {path}"
    assert raises(read_audio, path) == f"audio file is empty (0 samples): {path}"


def test_stereo_is_averaged_to_mono(tiny_root: Path, tmp_path: Path) -> None:
    mono = read_audio(flac(tiny_root))
    path = tmp_path / "stereo.wav"
    sf.write(str(path), np.stack([mono.numpy(), 0 * mono.numpy()], axis=1), 16000, subtype="FLOAT")
    out = read_audio(path)
    assert out.shape == mono.shape and float((out - mono / 2).abs().max()) < 1e-6


# --- transcripts and layout ----------------------------------------------------------------------


def test_empty_transcript_line(tiny_root: Path, tmp_path: Path) -> None:
    t = trans(tiny_root)
    lines = t.read_text(encoding="utf-8").splitlines()
    lines[1] = lines[1].split(" ")[0] + " "
    t.write_text("\n".join(lines) + "\n", encoding="utf-8")
    uid = lines[1].strip()
    assert raises(prepare, tiny_root, tmp_path / "out") == f"{t}:2: empty transcript for utterance {uid}"


def test_missing_split_and_root(tiny_root: Path, tmp_path: Path) -> None:
    msg = raises(prepare_librispeech, tiny_root, tmp_path / "o", ["test-clean"], progress=False)
    assert msg == f"split directory not found: {tiny_root / 'test-clean'}; {tiny_root} contains: dev-clean"
    missing = tmp_path / "nope"
    assert raises(prepare_librispeech, missing, tmp_path / "o", ["dev-clean"]) == f"LibriSpeech root not found: {missing}"


def test_no_training_text(tiny_root: Path, tmp_path: Path) -> None:
    msg = raises(prepare_librispeech, tiny_root, tmp_path / "o", ["dev-clean"], progress=False)
    assert msg.startswith("no labeled transcripts to train SentencePiece on") and "--spm-train-splits" in msg
    assert not (tmp_path / "o").exists()  # checked before anything is written


def test_vocab_too_small_for_the_characters(tiny_root: Path, tmp_path: Path) -> None:
    msg = raises(prepare, tiny_root, tmp_path / "out", vocab_size=20)
    assert msg.startswith(f"SentencePiece training for {tmp_path / 'out'} failed on 8 transcripts: ")
    assert "Vocabulary size is smaller than required_chars" in msg


def test_cli_exits_2_with_one_line(tiny_root: Path, tmp_path: Path) -> None:
    flac(tiny_root).write_bytes(b"not a flac at all" * 100)
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "prepare_librispeech.py"), "--root", str(tiny_root),
         "--out", str(tmp_path / "out"), "--splits", "dev-clean", "--spm-train-splits", "dev-clean", "--no-progress"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: cannot decode audio file {flac(tiny_root)} (corrupt or truncated?): " + errors[0].split("): ", 1)[1]]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "dev-clean.tsv").exists()


# --- manifests -----------------------------------------------------------------------------------

HEADER = "id\taudio\tn_frames\ttgt_text\tspeaker\n"


def test_manifest_missing_columns(tmp_path: Path) -> None:
    path = tmp_path / "test.tsv"
    path.write_text(HEADER + "a\ta.flac\t10\tHELLO\t1\nb\tb.flac\t20\n", encoding="utf-8")
    assert raises(read_manifest, path) == (
        f"{path}:3: expected 5 tab-separated columns (id, audio, n_frames, tgt_text, speaker), got 3"
    )


def test_manifest_bad_header(tmp_path: Path) -> None:
    path = tmp_path / "test.tsv"
    path.write_text("id\taudio\tframes\ttgt_text\tspeaker\na\ta.flac\t10\tHI\t1\n", encoding="utf-8")
    msg = raises(read_manifest, path)
    assert msg.startswith(f"{path}:1: bad header ") and "expected tab-separated columns id, audio, n_frames, tgt_text, speaker" in msg
    path.write_text("", encoding="utf-8")
    assert raises(read_manifest, path).startswith(f"{path}:1: empty manifest")


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", ""])
def test_manifest_bad_n_frames(tmp_path: Path, value: str) -> None:
    path = tmp_path / "test.tsv"
    path.write_text(HEADER + f"a\ta.flac\t{value}\tHI\t1\n", encoding="utf-8")
    assert raises(read_manifest, path) == f"{path}:2: n_frames must be an integer >= 0, got {value!r}"


def test_manifest_duplicate_id_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "test.tsv"
    path.write_text(HEADER + "a\ta.flac\t1\tHI\t1\na\tb.flac\t2\tHO\t1\n", encoding="utf-8")
    assert raises(read_manifest, path) == f"{path}:3: duplicate utterance id a (first on line 2)"
    assert raises(read_manifest, tmp_path / "none.tsv") == f"manifest not found: {tmp_path / 'none.tsv'}"


def test_manifest_roundtrip_extra_columns_relative_paths(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "test.tsv"
    path.parent.mkdir()
    path.write_text(HEADER.rstrip("\n") + "\textra\n" + "a\taudio/a.flac\t7\tHELLO WORLD\tspk\tx\n\n"
                    + "b\t/abs/b.flac\t0\t\tspk\n", encoding="utf-8")
    rows = read_manifest(path)
    assert rows == [
        ManifestRow("a", str(tmp_path / "sub" / "audio" / "a.flac"), 7, "HELLO WORLD", "spk", 2),
        ManifestRow("b", "/abs/b.flac", 0, "", "spk", 4),
    ]
    assert rows[0].labeled and not rows[1].labeled
    out = tmp_path / "w.tsv"
    write_manifest(out, rows)
    assert [r.id for r in read_manifest(out)] == ["a", "b"] and read_manifest(out)[0].audio == rows[0].audio
    with pytest.raises(DataError, match=re.escape("tgt_text contains a tab or newline")):
        write_manifest(out, [ManifestRow("c", "/c.flac", 1, "A\tB", "s")])
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path))
