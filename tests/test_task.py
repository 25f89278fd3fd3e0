"""The librispeech_asr task on real audio: batches, audio-only splits, and bad input failing at load time."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fairseq  # noqa: F401  (registration needs fairseq loaded first)
import fairseq_qasr  # noqa: F401
from fairseq_cli_helpers import run_fairseq, train_args
from fairseq_qasr.data.errors import DataError
from fairseq_qasr.tasks.librispeech_asr import LibriSpeechASRConfig, LibriSpeechASRTask
from fairseq_qasr.tasks.speech_dataset import batch_by_frames


def make_task(data: Path, **kw) -> LibriSpeechASRTask:
    return LibriSpeechASRTask.setup_task(LibriSpeechASRConfig(data=str(data), **kw))


def test_batches_hold_fbank_features_and_targets(prepared_sample: Path):
    task = make_task(prepared_sample)
    task.load_dataset("dev-clean")
    ds = task.dataset("dev-clean")
    batch = ds.collater([ds[i] for i in range(3)])
    feats, lengths = batch["net_input"]["src_tokens"], batch["net_input"]["src_lengths"]
    assert feats.shape[0] == 3 and feats.shape[2] == 80 and int(lengths.max()) == feats.shape[1]
    for i in range(3):  # manifest n_frames (10-ms frames) agrees with the Kaldi fbank frame count
        assert abs(int(lengths[i]) - ds.rows[i].n_frames) <= 2
    eos = task.target_dictionary.eos()
    assert (batch["net_input"]["prev_output_tokens"][:, 0] == eos).all()
    assert batch["labeled"].all() and batch["ntokens"] == int(batch["target"].ne(task.target_dictionary.pad()).sum())
    # targets decode back to the transcript through the data config's SentencePiece model
    text = task.bpe.decode(task.target_dictionary.string(ds[0]["target"]))
    assert text == ds.rows[0].tgt_text
    assert ds.specaugment is None  # not a training split


def test_training_split_applies_specaugment(prepared_sample: Path):
    task = make_task(prepared_sample)
    task.load_dataset("train-clean-5")
    ds = task.dataset("train-clean-5")
    assert ds.specaugment is not None and ds.shuffle
    torch.manual_seed(0)
    a, b = ds[0]["source"], task.feature_fn(__import__("fairseq_qasr.data.audio", fromlist=["x"]).read_audio(ds.rows[0].audio))
    assert a.shape == b.shape and not torch.equal(a, b)


def test_audio_only_split_is_loaded_as_unlabeled(prepared_sample: Path):
    task = make_task(prepared_sample, unlabeled="keep")
    task.load_dataset("train-clean-100")
    ds = task.dataset("train-clean-100")
    assert len(ds) == 6
    batch = ds.collater([ds[i] for i in range(len(ds))])
    assert not batch["labeled"].any()
    eos = task.target_dictionary.eos()
    assert (batch["target"][:, 0] == eos).all() and batch["target"].shape[1] == 1
    skipping = make_task(prepared_sample)  # default: skip unlabeled, and say so
    with pytest.raises(DataError, match=r"no usable utterances \(6 unlabeled ones skipped; see --unlabeled\)"):
        skipping.load_dataset("train-clean-100")


def copy_prepared(prepared: Path, tmp: Path) -> Path:
    """A writable copy of the prepared sample whose dev-clean audio lives in tmp (safe to damage)."""
    out = tmp / "data"
    shutil.copytree(prepared, out)
    audio = tmp / "audio"
    audio.mkdir()
    lines = (out / "dev-clean.tsv").read_text().splitlines()
    fixed = [lines[0]]
    for line in lines[1:]:
        cols = line.split("\t")
        dst = audio / Path(cols[1]).name
        shutil.copy(cols[1], dst)
        cols[1] = str(dst)
        fixed.append("\t".join(cols))
    (out / "dev-clean.tsv").write_text("\n".join(fixed) + "\n")
    return out


def third_row_audio(data: Path) -> str:
    return (data / "dev-clean.tsv").read_text().splitlines()[3].split("\t")[1]


@pytest.mark.parametrize("damage, message", [
    ("missing", r"dev-clean\.tsv:4: audio file not found: .*\.flac"),
    ("garbage", r"dev-clean\.tsv:4: cannot decode audio file .*\.flac \(corrupt or truncated\?\)"),
    ("truncated", r"dev-clean\.tsv:4: cannot decode audio file .*\.flac \(corrupt or truncated\?\)"),
    ("8khz", r"dev-clean\.tsv:4: .*\.flac is 8000 Hz, expected 16000 Hz; pass --resample-audio to resample"),
    ("columns", r"dev-clean\.tsv:4: expected 5 tab-separated columns .*got 3"),
])
def test_bad_input_fails_at_load_naming_file_and_line(prepared_sample: Path, tmp_path: Path, damage: str, message: str):
    data = copy_prepared(prepared_sample, tmp_path)
    path = Path(third_row_audio(data))
    if damage == "missing":
        path.unlink()
    elif damage == "garbage":
        path.write_bytes(b"fLaC" + bytes(range(256)) * 20)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "8khz":
        wav, rate = sf.read(path)
        sf.write(path, wav[::2], rate // 2, format="FLAC")
    elif damage == "columns":
        lines = (data / "dev-clean.tsv").read_text().splitlines()
        lines[3] = "\t".join(lines[3].split("\t")[:3])
        (data / "dev-clean.tsv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message):
        make_task(data).load_dataset("dev-clean")


def test_8khz_audio_is_resampled_on_request(prepared_sample: Path, tmp_path: Path):
    data = copy_prepared(prepared_sample, tmp_path)
    path = Path(third_row_audio(data))
    wav, rate = sf.read(path)
    sf.write(path, wav[::2], rate // 2, format="FLAC")
    task = make_task(data, resample_audio=True)
    task.load_dataset("dev-clean")
    ds = task.dataset("dev-clean")
    index = [r.audio for r in ds.rows].index(str(path))
    assert abs(ds[index]["source"].shape[0] - ds.rows[index].n_frames) <= 2


def test_fairseq_train_reports_bad_audio_with_file_and_line(prepared_sample: Path, tmp_path: Path):
    data = copy_prepared(prepared_sample, tmp_path)
    Path(third_row_audio(data)).unlink()
    proc = run_fairseq("train", train_args(data, tmp_path / "ck", 1, ["--train-subset", "dev-clean"]), check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert re.search(r"DataError: .*dev-clean\.tsv:4: audio file not found: .*\.flac", last), last


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 500), min_size=1, max_size=60), st.integers(1, 3000), st.integers(1, 8),
       st.one_of(st.none(), st.integers(1, 10)))
def test_batch_by_frames_keeps_every_utterance(frames, max_tokens, multiple, max_sentences):
    frames = np.asarray(frames)
    order = np.argsort(-frames, kind="mergesort")
    batches = batch_by_frames(order, frames, max_tokens, max_sentences, multiple)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(frames)))  # each exactly once, none dropped
    assert flat.tolist() == order.tolist()  # order kept
    for b in batches:
        if len(b) > 1:
            assert len(b) * frames[b].max() <= max_tokens
            assert max_sentences is None or len(b) <= max_sentences
