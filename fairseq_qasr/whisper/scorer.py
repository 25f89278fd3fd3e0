"""fairseq scorer ``whisper_wer``: WER after Whisper's English text normalizer on hypothesis and reference.

``fairseq-generate ... --scoring whisper_wer`` prints, e.g.::

    Generate test-clean with beam=1: WER (whisper-normalized): 5.64 (errors 226 / ref words 4008, 212 utts) | plain WER: 19.10

The plain WER beside it is fairseq's ``wer`` scorer on the same strings with its own options
(``--wer-tokenizer``, ``--wer-lowercase``, ``--wer-remove-punct``; all off by default). ``score()``
returns the normalized WER. As in OpenAI's LibriSpeech evaluation, pairs whose normalized reference is
empty are skipped.
"""
from __future__ import annotations

from dataclasses import dataclass

from fairseq.scoring import BaseScorer, register_scorer
from fairseq.scoring.wer import WerScorer, WerScorerConfig

from .normalizer import WerCounts, english_normalizer


@dataclass
class WhisperWerScorerConfig(WerScorerConfig):
    pass


@register_scorer("whisper_wer", dataclass=WhisperWerScorerConfig)
class WhisperWerScorer(BaseScorer):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.normalizer = english_normalizer()
        self.plain = WerScorer(cfg)
        self.reset()

    def reset(self):
        self.counts = WerCounts()
        self.plain.reset()
        self.skipped = 0

    def add_string(self, ref, pred):
        self.plain.add_string(ref, pred)
        nref = self.normalizer(ref)
        if not nref.split():
            self.skipped += 1
            return
        self.counts.add(nref, self.normalizer(pred))

    def score(self):
        return self.counts.wer

    def result_string(self):
        c = self.counts
        extra = f", {self.skipped} skipped: empty normalized reference" if self.skipped else ""
        return (f"WER (whisper-normalized): {c.wer:.2f} (errors {c.errors} / ref words {c.ref_words}, "
                f"{c.utterances} utts{extra}) | plain WER: {self.plain.score():.2f}")
