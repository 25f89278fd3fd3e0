"""Whisper's tokenizer (GPT-2 byte-level BPE via tiktoken + Whisper's special tokens) and the
mapping between Whisper token ids and fairseq dictionary indices.

The tokenizer is openai-whisper's own ``whisper/tokenizer.py`` with the vocabulary files the
``openai-whisper`` package ships (``whisper/assets/gpt2.tiktoken`` / ``multilingual.tiktoken``). The
module is loaded from the installed package *without* running ``whisper/__init__.py`` (which would
pull in numba and the whole model code), so no torch/numba import cost is paid for tokenizing.

Dictionary layout (``WhisperVocab``; fairseq's Dictionary always reserves indices 0-3):

==============  ==============================  =====================================
fairseq index   symbol in dict.txt              Whisper token id
==============  ==============================  =====================================
0               ``<s>`` (bos)                   ``<|startoftranscript|>`` (sot)
1               ``<pad>``                       none (logit suppressed: -inf)
2               ``</s>`` (eos)                  ``<|endoftext|>`` (eot)
3               ``<unk>``                       none (logit suppressed: -inf)
4, 5, ...       ``str(whisper_id)``             every other id in increasing order
==============  ==============================  =====================================

i.e. for English-only models (eot = 50256, sot = 50257): ``index = id + 4`` for ``id < 50256`` and
``index = id + 2`` for ``id > 50257``. Every Whisper token appears exactly once, so the fairseq
output softmax has the same support as Whisper's once pad/unk are suppressed.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sys
from typing import Iterable, List, Optional

import torch


def whisper_package_dir() -> str:
    """Directory of the installed openai-whisper package (not imported)."""
    spec = importlib.util.find_spec("whisper")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the openai-whisper package is needed for Whisper's tokenizer vocabulary and text normalizer: "
            "pip install --no-deps openai-whisper==20250625 tiktoken more-itertools")
    return list(spec.submodule_search_locations)[0]


def load_whisper_submodule(name: str):
    """Load ``whisper.<name>`` (a module or subpackage) without executing ``whisper/__init__.py``."""
    modname = f"_fairseq_qasr_whisper_{name}"
    if modname in sys.modules:
        return sys.modules[modname]
    base = os.path.join(whisper_package_dir(), name)
    if os.path.isdir(base):
        spec = importlib.util.spec_from_file_location(
            modname, os.path.join(base, "__init__.py"), submodule_search_locations=[base])
    else:
        spec = importlib.util.spec_from_file_location(modname, base + ".py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[modname] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[modname]
        raise
    return module


@functools.lru_cache(maxsize=None)
def get_tokenizer(multilingual: bool = False, num_languages: int = 99, language: Optional[str] = None,
                  task: Optional[str] = None):
    """openai-whisper's ``Tokenizer`` (same object ``whisper.tokenizer.get_tokenizer`` returns)."""
    mod = load_whisper_submodule("tokenizer")
    return mod.get_tokenizer(multilingual, num_languages=num_languages, language=language, task=task)


SPECIAL_FAIRSEQ_SYMBOLS = ("<s>", "<pad>", "</s>", "<unk>")


class WhisperVocab:
    """Whisper id <-> fairseq index mapping (see the module docstring)."""

    BOS, PAD, EOS, UNK = 0, 1, 2, 3
    N_RESERVED = 4

    def __init__(self, n_vocab: int, eot: int, sot: int):
        if not (0 <= eot < n_vocab and 0 <= sot < n_vocab and eot != sot):
            raise ValueError(f"bad special ids eot={eot} sot={sot} for n_vocab={n_vocab}")
        self.n_vocab, self.eot, self.sot = n_vocab, eot, sot
        lo, hi = sorted((eot, sot))
        self._lo, self._hi = lo, hi

    @classmethod
    def from_tokenizer(cls, tok) -> "WhisperVocab":
        return cls(tok.encoding.n_vocab, tok.eot, tok.sot)

    def __len__(self) -> int:
        """Size of the fairseq dictionary (= n_vocab + 2: pad and unk have no Whisper token)."""
        return self.n_vocab + 2

    def to_fairseq(self, wid: int) -> int:
        if wid == self.sot:
            return self.BOS
        if wid == self.eot:
            return self.EOS
        if not 0 <= wid < self.n_vocab:
            raise ValueError(f"Whisper id {wid} out of range [0, {self.n_vocab})")
        return self.N_RESERVED + wid - (wid > self._lo) - (wid > self._hi)

    def to_whisper(self, idx: int) -> Optional[int]:
        """Whisper id of fairseq index ``idx``; None for pad/unk."""
        if idx == self.BOS:
            return self.sot
        if idx == self.EOS:
            return self.eot
        if idx in (self.PAD, self.UNK):
            return None
        if not self.N_RESERVED <= idx < len(self):
            raise ValueError(f"fairseq index {idx} out of range [0, {len(self)})")
        wid = idx - self.N_RESERVED
        if wid >= self._lo:
            wid += 1
        if wid >= self._hi:
            wid += 1
        return wid

    def whisper_ids(self) -> torch.Tensor:
        """LongTensor [len(self)]: Whisper id of every fairseq index, -1 for pad and unk."""
        out = torch.full((len(self),), -1, dtype=torch.long)
        out[self.BOS], out[self.EOS] = self.sot, self.eot
        rest = [w for w in range(self.n_vocab) if w not in (self.sot, self.eot)]
        out[self.N_RESERVED:] = torch.tensor(rest, dtype=torch.long)
        return out

    def dict_lines(self) -> List[str]:
        """Lines of dict.txt (indices 4..): ``"<whisper id> 1"`` in fairseq-index order."""
        return [f"{int(w)} 1" for w in self.whisper_ids()[self.N_RESERVED:]]

    def write_dict(self, path: str) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("\n".join(self.dict_lines()) + "\n")
        os.replace(tmp, path)

    def symbol_to_whisper(self, sym: str) -> Optional[int]:
        """Whisper id of a dictionary symbol; None for pad/unk/unknown symbols."""
        if sym == "<s>":
            return self.sot
        if sym == "</s>":
            return self.eot
        try:
            return int(sym)
        except ValueError:
            return None


def encode(tok, text: str) -> List[int]:
    """Text -> Whisper ids (special-token strings in the text are encoded as plain text)."""
    return tok.encoding.encode(text, disallowed_special=())


def decode(tok, ids: Iterable[int]) -> str:
    """Whisper ids -> text exactly as openai-whisper's DecodingTask (timestamps dropped, stripped)."""
    return tok.decode([int(i) for i in ids]).strip()
