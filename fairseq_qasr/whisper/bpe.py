"""fairseq BPE ``whisper``: text <-> space-separated dictionary symbols (Whisper ids as decimal strings).

Data config: ``bpe_tokenizer: {bpe: whisper}`` (multilingual vocab: ``whisper_multilingual: true``).
``encode`` is lossless (case and punctuation kept; special-token strings are plain text). ``decode``
accepts the output of ``Dictionary.string`` (``<s>``/``</s>`` map to sot/eot, ``<pad>``/``<unk>`` and
anything non-numeric are dropped) and returns the text exactly as openai-whisper's decoding does
(timestamp tokens dropped, surrounding whitespace stripped).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from fairseq.data.encoders import register_bpe
from fairseq.dataclass import FairseqDataclass

from .tokenizer import WhisperVocab, get_tokenizer


@dataclass
class WhisperBPEConfig(FairseqDataclass):
    whisper_multilingual: bool = field(default=False, metadata={"help": "multilingual Whisper vocabulary (multilingual.tiktoken)"})
    whisper_num_languages: int = field(default=99, metadata={"help": "language tokens of the multilingual vocabulary (99; 100 for large-v3)"})


@register_bpe("whisper", dataclass=WhisperBPEConfig)
class WhisperBPE(object):
    def __init__(self, cfg):
        multilingual = bool(getattr(cfg, "whisper_multilingual", False))
        num_languages = int(getattr(cfg, "whisper_num_languages", 99))
        self.tokenizer = get_tokenizer(multilingual, num_languages)
        self.vocab = WhisperVocab.from_tokenizer(self.tokenizer)

    def encode(self, x: str) -> str:
        return " ".join(map(str, self.tokenizer.encoding.encode(x, disallowed_special=())))

    def ids(self, x: str):
        ids = []
        for sym in x.split():
            wid = self.vocab.symbol_to_whisper(sym)
            if wid is not None and 0 <= wid < self.vocab.n_vocab and wid not in (self.vocab.sot, self.vocab.eot):
                ids.append(wid)
        return ids

    def decode(self, x: str) -> str:
        return self.tokenizer.decode(self.ids(x)).strip()

    def is_beginning_of_word(self, x: str) -> bool:
        wid = self.vocab.symbol_to_whisper(x)
        if wid is None or wid >= self.tokenizer.eot:
            return True
        return self.tokenizer.encoding.decode([wid]).startswith(" ")
