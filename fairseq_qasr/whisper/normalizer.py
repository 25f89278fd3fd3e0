"""Whisper's English text normalizer (openai-whisper's ``EnglishTextNormalizer``) and a corpus WER.

The normalizer is the standard for reporting Whisper WER on LibriSpeech: lower-case, removes
bracketed/parenthesised spans, fillers and punctuation, standardises spellings (British -> American)
and numbers ("twenty five" -> "25"), contractions, etc. It is loaded from the installed openai-whisper
package without importing the rest of it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterable, Tuple

import editdistance

from .tokenizer import load_whisper_submodule


@functools.lru_cache(maxsize=1)
def english_normalizer():
    """openai-whisper's ``EnglishTextNormalizer()`` instance (callable str -> str)."""
    return load_whisper_submodule("normalizers").EnglishTextNormalizer()


def normalize(text: str) -> str:
    return english_normalizer()(text)


@dataclass
class WerCounts:
    errors: int = 0
    ref_words: int = 0
    utterances: int = 0

    def add(self, ref: str, hyp: str) -> Tuple[int, int]:
        r, h = ref.split(), hyp.split()
        e = editdistance.eval(r, h)
        self.errors += e
        self.ref_words += len(r)
        self.utterances += 1
        return e, len(r)

    @property
    def wer(self) -> float:
        return 100.0 * self.errors / self.ref_words if self.ref_words else 0.0


def whisper_wer(refs: Iterable[str], hyps: Iterable[str]) -> WerCounts:
    """Corpus WER (in %) after Whisper's English normalizer on both sides (= jiwer.wer on normalized text)."""
    counts = WerCounts()
    norm = english_normalizer()
    for ref, hyp in zip(refs, hyps):
        counts.add(norm(ref), norm(hyp))
    return counts
