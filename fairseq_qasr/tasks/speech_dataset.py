"""Fairseq dataset over LibriSpeech-style manifests: audio read with soundfile, features on the fly."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from fairseq.data import FairseqDataset, data_utils

from fairseq_qasr.data.audio import read_audio
from fairseq_qasr.data.errors import DataError
from fairseq_qasr.data.features import FeatureFn, SpecAugment
from fairseq_qasr.data.manifest import ManifestRow


class SpeechToTextDataset(FairseqDataset):
    """One item: ``{"id", "source": (frames, bins), "target": tokens + EOS, "labeled": bool}``.

    Unlabeled (audio-only) rows get a target of just EOS and ``labeled=False``; criteria that need
    transcripts use the ``labeled`` mask of the batch.
    """

    def __init__(self, rows: Sequence[ManifestRow], sources: Sequence[str], targets: List[Tensor], tgt_dict,
                 feature_fn: FeatureFn, specaugment: Optional[SpecAugment] = None, sample_rate: int = 16000,
                 resample: bool = False, shuffle: bool = False, fixed_frames: Optional[int] = None):
        self.rows, self.sources, self.targets, self.tgt_dict = list(rows), list(sources), targets, tgt_dict
        self.feature_fn, self.specaugment = feature_fn, specaugment
        self.sample_rate, self.resample, self.shuffle = sample_rate, resample, shuffle
        frames = [r.n_frames for r in self.rows] if fixed_frames is None else [fixed_frames] * len(self.rows)
        self.src_sizes = np.array(frames, dtype=np.int64)
        self.tgt_sizes = np.array([len(t) for t in targets], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        row = self.rows[index]
        where = f"{self.sources[index]}:{row.line}"
        waveform = read_audio(row.audio, self.sample_rate, self.resample, where=where)
        try:
            feats = self.feature_fn(waveform)
        except ValueError as err:
            raise DataError(f"{where}: {row.audio}: {err}") from err
        if self.specaugment is not None:
            feats = self.specaugment(feats)
        return {"id": index, "source": feats, "target": self.targets[index], "labeled": row.labeled}

    def collater(self, samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        if not samples:
            return {}
        pad, eos = self.tgt_dict.pad(), self.tgt_dict.eos()
        lengths = torch.tensor([s["source"].size(0) for s in samples], dtype=torch.long)
        feats = samples[0]["source"].new_zeros(len(samples), int(lengths.max()), samples[0]["source"].size(1))
        for i, s in enumerate(samples):
            feats[i, : s["source"].size(0)] = s["source"]
        targets = [s["target"] for s in samples]
        target = data_utils.collate_tokens(targets, pad, eos, left_pad=False)
        prev_output_tokens = data_utils.collate_tokens(targets, pad, eos, left_pad=False, move_eos_to_beginning=True)
        target_lengths = torch.tensor([len(t) for t in targets], dtype=torch.long)
        return {
            "id": torch.tensor([s["id"] for s in samples], dtype=torch.long),
            "net_input": {"src_tokens": feats, "src_lengths": lengths, "prev_output_tokens": prev_output_tokens},
            "target": target,
            "target_lengths": target_lengths,
            "labeled": torch.tensor([s["labeled"] for s in samples], dtype=torch.bool),
            "ntokens": int(target_lengths.sum()),
            "nsentences": len(samples),
        }

    def num_tokens(self, index: int) -> int:
        return int(self.src_sizes[index])

    def num_tokens_vec(self, indices: np.ndarray) -> np.ndarray:
        return self.src_sizes[indices]

    def size(self, index: int):
        return int(self.src_sizes[index]), int(self.tgt_sizes[index])

    @property
    def sizes(self) -> np.ndarray:
        return self.src_sizes

    def ordered_indices(self) -> np.ndarray:
        order = np.random.permutation(len(self)) if self.shuffle else np.arange(len(self))
        return order[np.argsort(-self.src_sizes[order], kind="mergesort")]

    def batch_by_size(self, indices: np.ndarray, max_tokens: Optional[int] = None, max_sentences: Optional[int] = None,
                      required_batch_size_multiple: int = 1) -> List[np.ndarray]:
        """Every index lands in exactly one batch (ve-fairseq 0.12.3's compiled ``batch_by_size`` drops the last
        partial batch when ``required_batch_size_multiple`` > 1, which would silently shrink evaluation sets)."""
        return batch_by_frames(indices, self.src_sizes, max_tokens, max_sentences, required_batch_size_multiple)

    def prefetch(self, indices):
        raise NotImplementedError

    @property
    def supports_prefetch(self) -> bool:
        return False


def batch_by_frames(indices: np.ndarray, frames: np.ndarray, max_tokens: Optional[int], max_sentences: Optional[int],
                    multiple: int = 1) -> List[np.ndarray]:
    """Greedy batches in ``indices`` order. A batch's padded size (``len * longest``) stays <= max_tokens (a single
    over-long utterance forms its own batch) and its length <= max_sentences; a cut batch is rounded down to a
    multiple of ``multiple`` when it holds more than that, the remainder starting the next batch."""
    multiple = max(1, multiple)

    def fits(n: int, longest: int) -> bool:
        if n <= 1:
            return True
        if max_sentences is not None and n > max_sentences:
            return False
        return max_tokens is None or n * longest <= max_tokens

    batches: List[np.ndarray] = []
    pending: List[int] = []
    longest = 0
    for index in indices:
        pending.append(int(index))
        longest = max(longest, int(frames[index]))
        while not fits(len(pending), longest):
            size = len(pending) - 1
            if size > multiple:
                size -= size % multiple
            batches.append(np.asarray(pending[:size], dtype=np.int64))
            pending = pending[size:]
            longest = max(int(frames[i]) for i in pending)
    if pending:
        batches.append(np.asarray(pending, dtype=np.int64))
    return batches


def encode_targets(rows: Sequence[ManifestRow], sources: Sequence[str], tgt_dict,
                   tokenize: Callable[[str], str]) -> List[Tensor]:
    """Token ids (+EOS) of every transcript; an unlabeled row gets just EOS."""
    targets = []
    for row, src in zip(rows, sources):
        if not row.labeled:
            targets.append(torch.tensor([tgt_dict.eos()], dtype=torch.long))
            continue
        ids = tgt_dict.encode_line(tokenize(row.tgt_text), add_if_not_exist=False, append_eos=True).long()
        if len(ids) <= 1:
            raise DataError(f"{src}:{row.line}: transcript of {row.id} encodes to no tokens")
        targets.append(ids)
    return targets
