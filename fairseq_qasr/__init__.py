"""fairseq-qasr: honest low-bit quantization of transformer speech recognizers (a Fairseq ``--user-dir`` plugin).

``register()`` registers the task ``librispeech_asr``, the ``qtransformer_conv`` architectures (and the
plugin's criteria and scorers) with fairseq and allowlists the classes of fairseq checkpoints for safe
(``weights_only``) loading. It runs on import when fairseq is already loaded — the case for ``--user-dir``
and for ``import fairseq; import fairseq_qasr`` — so that ``fairseq_qasr.quant`` and ``fairseq_qasr.data``
stay importable as plain torch without pulling in fairseq.
"""
import importlib
import sys

__version__ = "0.1.0"

# Registration modules, imported in order.
REGISTRATIONS = ["fairseq_qasr.models", "fairseq_qasr.tasks", "fairseq_qasr.criterions", "fairseq_qasr.whisper.register",
                 "fairseq_qasr.export.fairseq_model"]


def register() -> None:
    """Register everything with fairseq (idempotent); on Linux CPUs also keep freed memory (cpu_memory.py)."""
    from . import cpu_memory, distributed_guard
    from .checkpoint_safety import allow_fairseq_checkpoint_classes

    cpu_memory.keep_freed_memory()
    allow_fairseq_checkpoint_classes()
    distributed_guard.install()
    for name in REGISTRATIONS:
        importlib.import_module(name)


if "fairseq" in sys.modules:
    register()
