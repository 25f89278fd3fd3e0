"""Import for side effects: registers ``--bpe whisper`` and ``--scoring whisper_wer`` with fairseq."""
from . import bpe, scorer  # noqa: F401
