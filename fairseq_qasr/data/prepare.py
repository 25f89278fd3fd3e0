"""Prepare LibriSpeech (original layout) for training/evaluation.

``<root>/<split>/<speaker>/<chapter>/<id>.flac`` and ``<speaker>-<chapter>.trans.txt`` (lines
``<id> <TEXT>``) become, under ``out``: one manifest per split (``<split>.tsv``), a SentencePiece
unigram model (``spm.model``/``spm.vocab``), its fairseq dictionary (``dict.txt``, indices == spm
ids) and the data config (``config.yaml``). Audio without a transcript line is kept as unlabeled
(empty ``tgt_text``). Re-running with the same inputs rewrites nothing and does not retrain spm.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import yaml

from .audio import TARGET_SAMPLE_RATE, audio_info, check_sample_rate, n_frames_10ms
from .errors import DataError
from .manifest import ManifestRow, atomic_write_bytes, atomic_write_text, write_manifest

__all__ = [
    "SPECAUGMENT_DEFAULTS",
    "SPM_OPTIONS",
    "SplitSummary",
    "PrepareResult",
    "scan_split",
    "train_sentencepiece",
    "write_fairseq_dict",
    "prepare_librispeech",
    "format_summary",
]

SPECAUGMENT_DEFAULTS = {
    "freq_mask_F": 27,
    "freq_mask_N": 1,
    "time_mask_T": 40,
    "time_mask_N": 1,
    "time_mask_p": 1.0,
}

# Fixed trainer options (vocab_size is added per call). bos/pad/eos/unk = 0/1/2/3 is fairseq's
# Dictionary layout, so dict.txt (pieces with id >= 4) gives fairseq indices == spm ids.
SPM_OPTIONS = {
    "model_type": "unigram",
    "bos_id": 0,
    "pad_id": 1,
    "eos_id": 2,
    "unk_id": 3,
    "hard_vocab_limit": False,
    "character_coverage": 1.0,
    "num_threads": 1,
    "input_sentence_size": 0,
    "shuffle_input_sentence": False,
}
SPM_SEED = 1234
SPM_STAMP = "spm.stamp.json"
N_SPECIAL = 4


@dataclass
class SplitSummary:
    """Counts for one prepared split."""

    split: str
    utterances: int
    labeled: int
    unlabeled: int
    seconds: float

    @property
    def hours(self) -> float:
        return self.seconds / 3600.0


@dataclass
class PrepareResult:
    """What :func:`prepare_librispeech` did."""

    out: str
    splits: list[SplitSummary]
    spm_trained: bool
    spm_train_splits: list[str]  # training splits that contributed transcripts
    spm_train_sentences: int
    vocab_size: int  # actual number of spm pieces
    written: list[str] = field(default_factory=list)  # files (re)written in this run


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def _check_split_dir(root: str, split: str) -> str:
    if not os.path.isdir(root):
        raise DataError(f"LibriSpeech root not found: {root}")
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        have = [d for d in _listdir(root) if os.path.isdir(os.path.join(root, d))]
        raise DataError(
            f"split directory not found: {split_dir}; {root} contains: {', '.join(have) if have else '(nothing)'}"
        )
    return split_dir


def _read_transcripts(trans_path: str, flacs: dict[str, str]) -> dict[str, str]:
    """Parse one ``*.trans.txt``; every line must name an existing audio file of its chapter."""
    texts: dict[str, str] = {}
    first: dict[str, int] = {}
    try:
        with open(trans_path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{trans_path}: cannot read transcript file: {err}") from None
    for lineno, line in enumerate(lines, start=1):
        if line.strip() == "":
            continue
        uid, _, text = line.strip().partition(" ")
        text = text.strip()
        if uid in first:
            raise DataError(f"{trans_path}:{lineno}: duplicate transcript for utterance {uid} (first on line {first[uid]})")
        first[uid] = lineno
        if text == "":
            raise DataError(f"{trans_path}:{lineno}: empty transcript for utterance {uid}")
        if "\t" in text:
            raise DataError(f"{trans_path}:{lineno}: transcript for utterance {uid} contains a tab")
        if uid not in flacs:
            missing = os.path.join(os.path.dirname(trans_path), uid + ".flac")
            raise DataError(f"{trans_path}:{lineno}: transcript for utterance {uid} but its audio file {missing} is missing")
        texts[uid] = text
    return texts


def _list_split(split_dir: str) -> list[tuple[str, str, str, str]]:
    """``(id, flac_path, speaker, transcript_or_empty)`` for a split, sorted by id."""
    items: list[tuple[str, str, str, str]] = []
    seen: dict[str, str] = {}
    for speaker in _listdir(split_dir):
        spk_dir = os.path.join(split_dir, speaker)
        if not os.path.isdir(spk_dir):
            continue
        for chapter in _listdir(spk_dir):
            ch_dir = os.path.join(spk_dir, chapter)
            if not os.path.isdir(ch_dir):
                continue
            names = _listdir(ch_dir)
            flacs = {n[: -len(".flac")]: os.path.join(ch_dir, n) for n in names if n.endswith(".flac")}
            texts: dict[str, str] = {}
            for n in names:
                if n.endswith(".trans.txt"):
                    texts.update(_read_transcripts(os.path.join(ch_dir, n), flacs))
            for uid, path in flacs.items():
                if uid in seen:
                    raise DataError(f"{path}: duplicate utterance id {uid} (also {seen[uid]})")
                seen[uid] = path
                items.append((uid, os.path.abspath(path), speaker, texts.get(uid, "")))
    items.sort(key=lambda it: it[0])
    return items


def scan_split(
    root: str | os.PathLike, split: str, resample_audio: bool = False, progress: bool = False
) -> tuple[list[ManifestRow], SplitSummary]:
    """Read one LibriSpeech split: manifest rows (absolute audio paths) and its summary."""
    root = os.fspath(root)
    split_dir = _check_split_dir(root, split)
    items = _list_split(split_dir)
    if not items:
        raise DataError(f"no .flac files under {split_dir} (expected <speaker>/<chapter>/<id>.flac)")
    from tqdm import tqdm

    rows: list[ManifestRow] = []
    seconds = 0.0
    for i, (uid, path, speaker, text) in enumerate(
        tqdm(items, desc=split, unit="file", disable=not progress, file=sys.stderr, leave=False)
    ):
        rate, num_samples = audio_info(path)
        check_sample_rate(path, rate, TARGET_SAMPLE_RATE, resample=resample_audio)
        seconds += num_samples / rate
        rows.append(ManifestRow(uid, path, n_frames_10ms(num_samples, rate), text, speaker, line=i + 2))
    labeled = sum(r.labeled for r in rows)
    return rows, SplitSummary(split, len(rows), labeled, len(rows) - labeled, seconds)


def train_sentencepiece(texts: Sequence[str], out: str | os.PathLike, vocab_size: int = 1000) -> bool:
    """Train ``<out>/spm.model``/``spm.vocab`` on ``texts`` unless a stamp shows identical inputs.

    Returns True if it trained. Deterministic: one thread, no sampling/shuffling, fixed seed.
    """
    import sentencepiece as spm

    out = os.fspath(out)
    model, vocab, stamp_path = (os.path.join(out, n) for n in ("spm.model", "spm.vocab", SPM_STAMP))
    corpus = "\n".join(texts) + "\n"
    options = dict(SPM_OPTIONS, vocab_size=int(vocab_size), seed=SPM_SEED)
    stamp = {
        "sentencepiece": spm.__version__,
        "options": options,
        "sentences": len(texts),
        "text_sha256": hashlib.sha256(corpus.encode("utf-8")).hexdigest(),
    }
    if os.path.isfile(model) and os.path.isfile(vocab) and os.path.isfile(stamp_path):
        try:
            with open(stamp_path, encoding="utf-8") as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = {}
        if (
            {k: old.get(k) for k in stamp} == stamp
            and old.get("model_sha256") == _sha256_file(model)
            and old.get("vocab_sha256") == _sha256_file(vocab)
        ):
            return False
    # model_writer keeps the output path out of the model proto (model_prefix would be embedded),
    # so identical inputs give identical bytes wherever ``out`` is.
    buf = io.BytesIO()
    spm.set_random_generator_seed(SPM_SEED)
    trainer_opts = {k: v for k, v in options.items() if k != "seed"}
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=buf, minloglevel=2, **trainer_opts)
    except RuntimeError as err:  # e.g. "Vocabulary size is smaller than required_chars. 20 vs 28."
        detail = str(err).split("] ", 1)[-1]
        raise DataError(f"SentencePiece training for {out} failed on {len(texts)} transcripts: {detail}") from None
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    # Same format as sentencepiece's own <prefix>.vocab: "piece<TAB>score" (C++ default float format).
    vocab_text = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))
    atomic_write_text(vocab, vocab_text)
    atomic_write_bytes(model, buf.getvalue())
    stamp.update(model_sha256=_sha256_file(model), vocab_sha256=_sha256_file(vocab))
    atomic_write_text(stamp_path, json.dumps(stamp, indent=2, sort_keys=True) + "\n")
    return True


def write_fairseq_dict(model: str | os.PathLike, dict_path: str | os.PathLike, texts: Iterable[str]) -> bool:
    """Write the fairseq dictionary of an spm model: ``piece count`` for ids >= 4, in id order.

    count = occurrences of the piece when encoding ``texts`` (at least 1, so no tool prunes it).
    Returns True if the file changed.
    """
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=os.fspath(model))
    specials = [sp.id_to_piece(i) for i in range(N_SPECIAL)]
    if specials != ["<s>", "<pad>", "</s>", "<unk>"]:
        raise DataError(f"{model}: spm special ids 0-3 are {specials}, expected <s>, <pad>, </s>, <unk>")
    counts: Counter[int] = Counter()
    for ids in sp.encode(list(texts)):
        counts.update(ids)
    lines = [f"{sp.id_to_piece(i)} {max(counts[i], 1)}" for i in range(N_SPECIAL, sp.get_piece_size())]
    return atomic_write_text(dict_path, "\n".join(lines) + "\n", only_if_changed=True)


def _load_config(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f)
        return cfg if isinstance(cfg, dict) else {}
    except (OSError, yaml.YAMLError):
        return {}


def _split_entry(s: SplitSummary) -> dict:
    return {"utterances": s.utterances, "labeled": s.labeled, "unlabeled": s.unlabeled, "hours": round(s.hours, 4)}


def write_data_config(out: str, summaries: Sequence[SplitSummary]) -> bool:
    """Write ``<out>/config.yaml``; keeps entries of earlier-prepared splits whose manifest still exists."""
    path = os.path.join(out, "config.yaml")
    splits = {}
    old = _load_config(path).get("splits")
    if isinstance(old, dict):
        for name, entry in old.items():
            if os.path.isfile(os.path.join(out, f"{name}.tsv")):
                splits[str(name)] = entry
    splits.update({s.split: _split_entry(s) for s in summaries})
    cfg = {
        "sample_rate": TARGET_SAMPLE_RATE,
        "features": {"type": "fbank", "num_mel_bins": 80, "cmvn": "utterance"},
        "specaugment": dict(SPECAUGMENT_DEFAULTS),
        "bpe_tokenizer": {"bpe": "sentencepiece", "sentencepiece_model": "spm.model"},
        "vocab_filename": "dict.txt",
        "splits": {k: splits[k] for k in sorted(splits)},
    }
    text = (
        "# Written by scripts/prepare_librispeech.py. specaugment is applied to training splits only.\n"
        + yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False)
    )
    return atomic_write_text(path, text, only_if_changed=True)


def prepare_librispeech(
    root: str | os.PathLike,
    out: str | os.PathLike,
    splits: Sequence[str],
    vocab_size: int = 1000,
    spm_train_splits: Sequence[str] | None = None,
    resample_audio: bool = False,
    progress: bool = True,
) -> PrepareResult:
    """Prepare ``splits`` of a LibriSpeech-layout ``root`` into ``out`` (see module docstring).

    spm is trained on the labeled transcripts of ``spm_train_splits`` (default: the splits whose
    name starts with "train"). With no training text, an existing ``<out>/spm.model`` is reused.
    """
    root, out = os.fspath(root), os.fspath(out)
    splits = list(dict.fromkeys(splits))
    if not splits:
        raise DataError("no splits given")
    if spm_train_splits is None:
        spm_train_splits = [s for s in splits if s.startswith("train")]
    else:
        spm_train_splits = list(dict.fromkeys(spm_train_splits))
        unknown = [s for s in spm_train_splits if s not in splits]
        if unknown:
            raise DataError(f"--spm-train-splits {' '.join(unknown)} not among --splits {' '.join(splits)}")
    for split in splits:  # fail fast on a missing split before any slow work
        _check_split_dir(root, split)

    scanned = {split: scan_split(root, split, resample_audio=resample_audio, progress=progress) for split in splits}
    train_texts = [r.tgt_text for s in spm_train_splits for r in scanned[s][0] if r.labeled]

    model, dict_path = os.path.join(out, "spm.model"), os.path.join(out, "dict.txt")
    if not train_texts and not (os.path.isfile(model) and os.path.isfile(dict_path)):
        which = " ".join(spm_train_splits) if spm_train_splits else "(none: no split name starts with 'train')"
        raise DataError(
            f"no labeled transcripts to train SentencePiece on in splits {which}, and no existing {model}; "
            "pass --spm-train-splits with labeled splits"
        )

    os.makedirs(out, exist_ok=True)
    written: list[str] = []
    for split in splits:
        path = os.path.join(out, f"{split}.tsv")
        if write_manifest(path, scanned[split][0], only_if_changed=True):
            written.append(path)

    trained = False
    if train_texts:
        trained = train_sentencepiece(train_texts, out, vocab_size=vocab_size)
        if trained:
            written += [model, os.path.join(out, "spm.vocab")]
        if write_fairseq_dict(model, dict_path, train_texts):
            written.append(dict_path)
    if write_data_config(out, [scanned[s][1] for s in splits]):
        written.append(os.path.join(out, "config.yaml"))

    import sentencepiece as spm

    n_pieces = spm.SentencePieceProcessor(model_file=model).get_piece_size()
    return PrepareResult(
        out=out,
        splits=[scanned[s][1] for s in splits],
        spm_trained=trained,
        spm_train_splits=[s for s in spm_train_splits if any(r.labeled for r in scanned[s][0])],
        spm_train_sentences=len(train_texts),
        vocab_size=n_pieces,
        written=written,
    )


def format_summary(result: PrepareResult) -> str:
    """A short per-split table plus one line about SentencePiece."""
    width = max([len("split"), len("total")] + [len(s.split) for s in result.splits])
    head = f"{'split':<{width}}  {'utterances':>10}  {'labeled':>8}  {'unlabeled':>9}  {'hours':>8}"
    lines = [head, "-" * len(head)]
    for s in result.splits:
        lines.append(f"{s.split:<{width}}  {s.utterances:>10}  {s.labeled:>8}  {s.unlabeled:>9}  {s.hours:>8.3f}")
    tot = SplitSummary(
        "total",
        sum(s.utterances for s in result.splits),
        sum(s.labeled for s in result.splits),
        sum(s.unlabeled for s in result.splits),
        sum(s.seconds for s in result.splits),
    )
    lines.append("-" * len(head))
    lines.append(f"{'total':<{width}}  {tot.utterances:>10}  {tot.labeled:>8}  {tot.unlabeled:>9}  {tot.hours:>8.3f}")
    if result.spm_train_splits:
        how = "trained" if result.spm_trained else "unchanged (inputs identical, not retrained)"
        lines.append(
            f"SentencePiece unigram, {result.vocab_size} pieces: {how}; "
            f"{result.spm_train_sentences} transcripts of {', '.join(result.spm_train_splits)}"
        )
    else:
        lines.append(f"SentencePiece: kept existing model ({result.vocab_size} pieces); no training transcripts given")
    lines.append(f"output: {result.out} ({len(result.written)} file(s) written)")
    return "\n".join(lines)
