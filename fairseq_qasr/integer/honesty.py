"""Proof that the engine computes with integers only: a TorchDispatchMode that sees every executed aten op
and flags any op that reads or writes a floating-point tensor."""
from __future__ import annotations

from collections import Counter
from typing import Any, Callable, List, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class IntegerOnlyMode(TorchDispatchMode):
    """Records ``(aten op, dtypes)`` of every op; ``violations`` lists those touching float/complex tensors."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.violations: List[Tuple[str, Tuple[str, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat_in, _ = tree_flatten((args, kwargs or {}))
        flat_out, _ = tree_flatten(out)
        dtypes = tuple(str(t.dtype).replace("torch.", "") for t in flat_in + flat_out if isinstance(t, torch.Tensor))
        name = str(func.overloadpacket.__name__) if hasattr(func, "overloadpacket") else str(func)
        self.ops[(name, dtypes)] += 1
        if any(t.dtype.is_floating_point or t.dtype.is_complex for t in flat_in + flat_out if isinstance(t, torch.Tensor)):
            self.violations.append((name, dtypes))
        return out


def run_integer_only(fn: Callable[[], Any]) -> Tuple[Any, IntegerOnlyMode]:
    """Run ``fn()`` under :class:`IntegerOnlyMode`; returns (result, mode)."""
    mode = IntegerOnlyMode()
    with mode:
        result = fn()
    return result, mode
