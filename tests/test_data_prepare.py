"""prepare_librispeech on real LibriSpeech audio: manifests, spm/dict.txt, config.yaml, idempotency."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import sentencepiece as spm
import yaml

from fairseq_qasr.data.audio import audio_info, read_audio
from fairseq_qasr.data.manifest import MANIFEST_COLUMNS, read_manifest
from fairseq_qasr.data.prepare import SPECAUGMENT_DEFAULTS, format_summary, prepare_librispeech

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_SPLITS = ("train-clean-5", "dev-clean", "test-clean", "train-clean-100")  # as conftest.prepared_sample


def corpus(split_dir: Path) -> tuple[set[str], dict[str, str]]:
    """(all utterance ids with audio, {id: transcript}) straight from the LibriSpeech layout."""
    ids = {p.name[: -len(".flac")] for p in split_dir.glob("*/*/*.flac")}
    texts = {}
    for trans in split_dir.glob("*/*/*.trans.txt"):
        for line in trans.read_text(encoding="utf-8").splitlines():
            uid, text = line.split(" ", 1)
            texts[uid] = text
    return ids, texts


def load_cli():
    spec = importlib.util.spec_from_file_location("prepare_cli", REPO_ROOT / "scripts" / "prepare_librispeech.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_manifests_rows_and_columns(prepared_sample: Path, sample_root: Path) -> None:
    for split in SAMPLE_SPLITS:
        path = prepared_sample / f"{split}.tsv"
        assert path.read_text(encoding="utf-8").splitlines()[0].split("\t") == list(MANIFEST_COLUMNS)
        rows = read_manifest(path)
        ids, texts = corpus(sample_root / split)
        assert [r.id for r in rows] == sorted(ids)
        for r in rows:
            assert os.path.isabs(r.audio) and os.path.isfile(r.audio)
            assert Path(r.audio) == (sample_root / split).resolve() / r.speaker / r.id.split("-")[1] / f"{r.id}.flac"
            assert r.speaker == r.id.split("-")[0]
            assert r.tgt_text == texts.get(r.id, "")
        assert [r.line for r in rows] == list(range(2, len(rows) + 2))


def test_n_frames_match_audio(prepared_sample: Path) -> None:
    for split in SAMPLE_SPLITS:
        for r in read_manifest(prepared_sample / f"{split}.tsv"):
            rate, n = audio_info(r.audio)
            wav = read_audio(r.audio)
            assert rate == 16000 and wav.ndim == 1 and wav.numel() == n
            assert r.n_frames == n // 160 > 0
            assert float(wav.abs().max()) <= 1.0


def test_spm_and_dict_consistent(prepared_sample: Path) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(prepared_sample / "spm.model"))
    assert [sp.id_to_piece(i) for i in range(4)] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert (sp.bos_id(), sp.pad_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    entries = [line.rsplit(" ", 1) for line in (prepared_sample / "dict.txt").read_text(encoding="utf-8").splitlines()]
    assert [piece for piece, _ in entries] == [sp.id_to_piece(i) for i in range(4, sp.get_piece_size())]
    assert all(int(count) >= 1 for _, count in entries)
    vocab = [line.split("\t")[0] for line in (prepared_sample / "spm.vocab").read_text(encoding="utf-8").splitlines()]
    assert vocab == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    # Every training transcript is covered (character_coverage=1.0): no <unk>.
    for r in read_manifest(prepared_sample / "train-clean-5.tsv"):
        assert sp.unk_id() not in sp.encode(r.tgt_text)
        assert sp.decode(sp.encode(r.tgt_text)) == r.tgt_text


def test_fairseq_dictionary_indices_equal_spm_ids(prepared_sample: Path) -> None:
    data = pytest.importorskip("fairseq.data")
    d = data.Dictionary.load(str(prepared_sample / "dict.txt"))
    sp = spm.SentencePieceProcessor(model_file=str(prepared_sample / "spm.model"))
    assert len(d) == sp.get_piece_size()
    assert (d.bos(), d.pad(), d.eos(), d.unk()) == (0, 1, 2, 3)
    assert all(d.index(sp.id_to_piece(i)) == i for i in range(4, sp.get_piece_size()))


def test_config_yaml(prepared_sample: Path) -> None:
    cfg = yaml.safe_load((prepared_sample / "config.yaml").read_text(encoding="utf-8"))
    assert cfg["sample_rate"] == 16000
    assert cfg["features"] == {"type": "fbank", "num_mel_bins": 80, "cmvn": "utterance"}
    assert cfg["specaugment"] == SPECAUGMENT_DEFAULTS == {
        "freq_mask_F": 27, "freq_mask_N": 1, "time_mask_T": 40, "time_mask_N": 1, "time_mask_p": 1.0}
    assert cfg["bpe_tokenizer"] == {"bpe": "sentencepiece", "sentencepiece_model": "spm.model"}
    assert cfg["vocab_filename"] == "dict.txt"
    assert set(cfg["splits"]) == set(SAMPLE_SPLITS)
    for split in SAMPLE_SPLITS:
        rows = read_manifest(prepared_sample / f"{split}.tsv")
        entry = cfg["splits"][split]
        assert entry["utterances"] == len(rows)
        assert entry["labeled"] == sum(r.labeled for r in rows)
        assert entry["unlabeled"] == sum(not r.labeled for r in rows)
        assert entry["hours"] == pytest.approx(sum(r.n_frames for r in rows) / 100 / 3600, abs=2e-4)


def test_audio_only_split_is_unlabeled(prepared_sample: Path) -> None:
    rows = read_manifest(prepared_sample / "train-clean-100.tsv")
    assert len(rows) == 6 and not any(r.labeled for r in rows)
    cfg = yaml.safe_load((prepared_sample / "config.yaml").read_text(encoding="utf-8"))
    assert cfg["splits"]["train-clean-100"] == {**cfg["splits"]["train-clean-100"], "labeled": 0, "unlabeled": 6}
    assert cfg["splits"]["train-clean-5"]["unlabeled"] == 0


def test_audio_without_transcript_line_is_unlabeled(tiny_root: Path, tmp_path: Path) -> None:
    trans = tiny_root / "dev-clean/251/137823/251-137823.trans.txt"
    lines = trans.read_text(encoding="utf-8").splitlines()
    dropped = lines[0].split(" ", 1)[0]
    trans.write_text("\n".join(lines[1:]) + "\n", encoding="utf-8")
    res = prepare_librispeech(tiny_root, tmp_path / "out", ["dev-clean"], spm_train_splits=["dev-clean"], progress=False)
    assert (res.splits[0].utterances, res.splits[0].labeled, res.splits[0].unlabeled) == (8, 7, 1)
    rows = {r.id: r for r in read_manifest(tmp_path / "out" / "dev-clean.tsv")}
    assert rows[dropped].tgt_text == "" and not rows[dropped].labeled


def test_idempotent_and_deterministic(sample_root: Path, prepared_sample: Path, tmp_path: Path) -> None:
    out = tmp_path / "ls"
    first = prepare_librispeech(sample_root, out, SAMPLE_SPLITS, progress=False)
    assert first.spm_trained and first.spm_train_splits == ["train-clean-5"]
    snapshot = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    assert {f"{s}.tsv" for s in SAMPLE_SPLITS} | {"spm.model", "spm.vocab", "dict.txt", "config.yaml"} <= set(snapshot)
    second = prepare_librispeech(sample_root, out, SAMPLE_SPLITS, progress=False)
    assert not second.spm_trained and second.written == []
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == snapshot
    # Same inputs elsewhere give the same bytes (nothing path- or time-dependent in spm.model).
    assert {p.name: p.read_bytes() for p in prepared_sample.iterdir()} == {k: v[0] for k, v in snapshot.items()}
    # Changed spm options retrain.
    third = prepare_librispeech(sample_root, out, SAMPLE_SPLITS, vocab_size=120, progress=False)
    assert third.spm_trained and third.vocab_size <= 120 + 4


def test_spm_train_splits_override_and_incremental_config(sample_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "ls"
    res = prepare_librispeech(sample_root, out, ["dev-clean", "test-clean"], spm_train_splits=["dev-clean"], progress=False)
    assert res.spm_train_splits == ["dev-clean"] and res.spm_train_sentences == 8
    # Later run with no training split reuses spm and keeps the earlier splits in config.yaml.
    model = (out / "spm.model").read_bytes()
    res = prepare_librispeech(sample_root, out, ["test-other"], progress=False)
    assert not res.spm_trained and (out / "spm.model").read_bytes() == model
    cfg = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    assert list(cfg["splits"]) == ["dev-clean", "test-clean", "test-other"]


def test_cli_prints_summary(sample_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cli = load_cli()
    argv = ["--root", str(sample_root), "--out", str(tmp_path / "ls"), "--splits", "dev-clean", "train-clean-100",
            "--spm-train-splits", "dev-clean", "--vocab-size", "100", "--no-progress"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "utterances" in out and "labeled" in out and "unlabeled" in out and "hours" in out
    table = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.split()}
    assert table["dev-clean"][:3] == ["8", "8", "0"]
    assert table["train-clean-100"][:3] == ["6", "0", "6"]
    assert table["total"][:3] == ["14", "8", "6"]


def test_format_summary_mentions_retraining(sample_root: Path, tmp_path: Path) -> None:
    kw = dict(spm_train_splits=["dev-clean"], progress=False)
    assert "trained" in format_summary(prepare_librispeech(sample_root, tmp_path, ["dev-clean"], **kw))
    assert "not retrained" in format_summary(prepare_librispeech(sample_root, tmp_path, ["dev-clean"], **kw))


def test_shared_librispeech_dev_clean(repo_root: Path, tmp_path: Path) -> None:
    root = repo_root / ".." / "shared" / "LibriSpeech"
    if not (root / "dev-clean").is_dir():
        pytest.skip("../shared/LibriSpeech not present: the full LibriSpeech copy is only on the project machines")
    res = prepare_librispeech(root, tmp_path, ["dev-clean"], spm_train_splits=["dev-clean"], progress=False)
    ids, texts = corpus(root / "dev-clean")
    rows = read_manifest(tmp_path / "dev-clean.tsv")
    assert [r.id for r in rows] == sorted(ids) and res.splits[0].utterances == len(ids)
    assert all(r.tgt_text == texts[r.id] for r in rows)
    assert res.splits[0].labeled == len(texts)
