"""Safe checkpoint loading under torch >= 2.6.

torch >= 2.6 loads with ``weights_only=True``: only tensors, plain containers and allowlisted classes are
unpickled, so a downloaded checkpoint cannot run code. Fairseq 0.12 checkpoints written by this plugin hold
plain containers only; older or hand-made ones hold an ``argparse.Namespace`` (``args``) or an OmegaConf
config (``cfg``); distributed runs broadcast a loaded checkpoint to the other ranks with fairseq's
``_TensorPlaceholder`` standing in for its tensors. We allowlist exactly the classes those need — measured by unpickling such checkpoints — and
never fall back to ``weights_only=False``. Anything else (a foreign pickled object) is refused by torch with
an ``UnpicklingError`` naming the offending global.
"""
import argparse
import collections
import typing
from typing import List

import torch
from fairseq.distributed.utils import _TensorPlaceholder
from omegaconf import DictConfig, ListConfig
from omegaconf.base import ContainerMetadata, Metadata
from omegaconf.nodes import AnyNode

SAFE_GLOBALS: List[object] = [
    argparse.Namespace,  # legacy ``args``
    DictConfig, ListConfig, ContainerMetadata, Metadata, AnyNode, typing.Any,  # OmegaConf ``cfg``
    dict, list, int, collections.defaultdict,  # constructors OmegaConf's pickles call; side-effect free
    _TensorPlaceholder,  # a dataclass holding an index: fairseq broadcasts checkpoints to other ranks with it
]


def allow_fairseq_checkpoint_classes() -> List[object]:
    """Allowlist the classes of fairseq checkpoints for ``torch.load(weights_only=True)``; returns them."""
    torch.serialization.add_safe_globals(SAFE_GLOBALS)
    return list(SAFE_GLOBALS)
