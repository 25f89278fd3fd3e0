"""All-integer inference engine (plain torch, no fairseq): see :mod:`.engine` and docs/export.md."""
from .engine import Acc, IntegerEngine, QT

__all__ = ["IntegerEngine", "QT", "Acc"]
