"""Honesty audit: run real inputs under a TorchDispatchMode and prove every compute op is integer.

Quantizers register each tensor they produce with its grid (:mod:`.audit_state`); ops executed inside
a quantizer are requantization. Data-movement ops carry a tensor's grid to their outputs. Every other
aten op is compute: inside a quantized op's compute region, each input that comes from outside the
region must lie on its declared grid (checked value by value); outside any quantized op, compute on
float tensors is a violation. Integer-only compute (token positions, lengths) is integer by nature.
"""
from __future__ import annotations

import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from . import audit_state
from .affine import on_grid
from .audit_ops import CREATION, DATA_MOVEMENT, MAC_OPS, PREDICATE
from .audit_state import Grid, TensorSet, index_derived


@dataclass
class Violation:
    op: str
    path: str
    detail: str

    def __str__(self) -> str:
        return f"{self.op} at '{self.path or '<root>'}': {self.detail}"


@dataclass
class _Row:
    count: int = 0
    macs: int = 0
    bits: Dict[int, set] = field(default_factory=lambda: defaultdict(set))


@dataclass
class AuditReport:
    rows: Dict[Tuple[str, str], _Row]
    violations: List[Violation]
    counts: Dict[str, int]

    @property
    def ok(self) -> bool:
        return not self.violations

    def table(self) -> str:
        total = sum(r.macs for r in self.rows.values()) or 1
        lines = [f"{'quantized op':<14} {'aten op':<24} {'count':>6} {'MACs %':>7}  input bits",
                 "-" * 78]
        for (qop, aop), r in sorted(self.rows.items()):
            bits = ", ".join("/".join(_fmt_bits(b) for b in sorted(r.bits[i], key=_bits_order)) for i in sorted(r.bits))
            lines.append(f"{qop:<14} {aop:<24} {r.count:>6} {100.0 * r.macs / total:>7.2f}  [{bits}]")
        lines.append("-" * 78)
        lines.append("other ops: " + ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items())))
        if self.ok:
            lines.append("VERDICT: PASS - every compute op took inputs on a declared integer grid")
        else:
            lines.append(f"VERDICT: FAIL - {len(self.violations)} violation(s)")
            seen = set()
            for v in self.violations:
                if str(v) not in seen:
                    seen.add(str(v))
                    lines.append(f"  VIOLATION {v}")
                if len(seen) >= 50:
                    lines.append("  ...")
                    break
        return "\n".join(lines)


def _bits_order(b: Any) -> tuple:
    """Integer widths first (narrow to wide), then labels such as 'float' (an input seen on both)."""
    return (1, 0, b) if isinstance(b, str) else (0, b, "")


def _fmt_bits(b: Any) -> str:
    return b if isinstance(b, str) else f"int{b}"


class _Region:
    def __init__(self, kind: str, module: nn.Module, op_type: str):
        self.kind, self.module, self.op_type = kind, module, op_type
        self.produced: Dict[int, Any] = {}


class Auditor(TorchDispatchMode):
    """Records and checks every aten op of the forward passes run inside ``with Auditor(model):``."""

    def __init__(self, model: nn.Module, max_violations: int = 1000):
        super().__init__()
        self.paths = {id(m): p for p, m in model.named_modules()}
        self.max_violations = max_violations
        self.tags: Dict[int, Tuple[Any, Grid]] = {}
        self.regions: List[_Region] = []
        self.mod_stack: List[str] = []
        self.rows: Dict[Tuple[str, str], _Row] = defaultdict(_Row)
        self.counts: Dict[str, int] = defaultdict(int)
        self.violations: List[Violation] = []
        self.derived = TensorSet()  # float tensors computed from integer metadata (lengths, positions)
        self._handles: list = []

    # --- recorder protocol (called by quantizers / quantized modules) ---------------------
    def register(self, t: Tensor, grid: Grid) -> None:
        self._tag(t, grid)

    def push(self, kind: str, module: nn.Module, op_type: str) -> None:
        self.regions.append(_Region(kind, module, op_type))

    def pop(self) -> None:
        self.regions.pop()

    # --- context -------------------------------------------------------------------------------
    def __enter__(self):
        self._old = audit_state.set_recorder(self)
        paths = self.paths

        def pre(m, args):
            if id(m) in paths:
                self.mod_stack.append(paths[id(m)])

        def post(m, args, out):
            if id(m) in paths and self.mod_stack:
                self.mod_stack.pop()

        self._handles = [nn.modules.module.register_module_forward_pre_hook(pre),
                         nn.modules.module.register_module_forward_hook(post, always_call=True)]
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        audit_state.set_recorder(self._old)
        return super().__exit__(*exc)

    def report(self) -> AuditReport:
        return AuditReport(dict(self.rows), list(self.violations), dict(self.counts))

    # --- tags ----------------------------------------------------------------------------------
    def _tag(self, t: Tensor, grid: Grid) -> None:
        key = id(t)
        self.tags[key] = (weakref.ref(t, lambda _r, k=key: self.tags.pop(k, None)), grid)

    def _grid(self, t: Tensor) -> Optional[Grid]:
        entry = self.tags.get(id(t))
        if entry is None or entry[0]() is not t:
            return None
        return entry[1]

    def _propagate(self, func, name: str, args, kwargs, out) -> None:
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, Tensor)]
        if not outs:
            return
        tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, Tensor)]
        if name in ("copy_", "copy"):
            src = args[1] if len(args) > 1 else None
            g = self._grid(src) if isinstance(src, Tensor) else None
            for o in outs:
                if g is not None:
                    self._tag(o, g)
                else:  # overwritten with untagged values: the old grid no longer applies
                    self.tags.pop(id(o), None)
            return
        data = [t for t in tensors if t.is_floating_point()]
        grids = [self._grid(t) for t in data]
        if not data or any(g is None for g in grids):
            return
        g0 = grids[0]
        if all(_same_per_tensor(g, g0) for g in grids):
            for o in outs:
                self._tag(o, g0)
            return
        if len(data) != 1:
            return  # mixed per-channel grids (e.g. cat): untagged, a later compute op will report it
        x = data[0]
        try:
            with torch.no_grad():
                full_s = g0.scale.expand(x.shape).contiguous().to(x.dtype)
                full_z = g0.zero_point.expand(x.shape).contiguous().to(x.dtype)
                s_out = func(*_swap(args, x, full_s), **_swap(kwargs, x, full_s))
                z_out = func(*_swap(args, x, full_z), **_swap(kwargs, x, full_z))
        except Exception:
            return
        s_list = [o for o in tree_flatten(s_out)[0] if isinstance(o, Tensor)]
        z_list = [o for o in tree_flatten(z_out)[0] if isinstance(o, Tensor)]
        for o, s, z in zip(outs, s_list, z_list):
            if s.shape == o.shape:
                self._tag(o, Grid(s, z, g0.qmin, g0.qmax, g0.bits, g0.allow_neg_inf))

    # --- the dispatch hook ---------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        region = self.regions[-1] if self.regions else None
        if region is not None and region.kind == "requant":
            self.counts["requantize"] += 1
            return out
        tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, Tensor)]
        floats = [t for t in tensors if t.is_floating_point()]
        if (tensors and not floats and name not in CREATION) or (
                index_derived(floats, self.derived) and name not in CREATION):
            self.counts["integer/index"] += 1
            for o in tree_flatten(out)[0]:
                if isinstance(o, Tensor) and o.is_floating_point():
                    self.derived.add(o)
            return out
        if name in DATA_MOVEMENT or name in CREATION:
            self.counts["data_movement" if name in DATA_MOVEMENT else "creation"] += 1
            if name in DATA_MOVEMENT:
                self._propagate(func, name, args, kwargs, out)
            if region is not None:
                self._mark_produced(region, args, kwargs, out, name)
            return out
        if name in PREDICATE:
            self.counts["predicate"] += 1
            return out
        if region is None:
            self._violate(str(func), self._where(), "float compute outside any quantized op")
            self.rows[("FLOAT", name)].count += 1
            return out
        row = self.rows[(region.op_type, name)]
        row.count += 1
        row.macs += _macs(name, args, out)
        for i, t in enumerate(tensors):
            if not t.is_floating_point():
                row.bits[i].add("int")
                continue
            if id(t) in region.produced:
                row.bits[i].add("acc")
                continue
            g = self._grid(t)
            path = self.paths.get(id(region.module), self._where())
            if g is None:
                self._violate(str(func), path, f"input {i} of {region.op_type} is float (no declared grid)")
                row.bits[i].add("float")
                continue
            ok, why = on_grid(t, g.scale, g.zero_point, g.qmin, g.qmax, g.allow_neg_inf)
            if not ok:
                self._violate(str(func), path, f"input {i} of {region.op_type} not on its int{g.bits} grid: {why}")
            row.bits[i].add(g.bits)
        self._mark_produced(region, args, kwargs, out, name)
        return out

    def _mark_produced(self, region: _Region, args, kwargs, out, name: str) -> None:
        ins = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, Tensor)]
        if name in DATA_MOVEMENT and ins and not any(id(t) in region.produced for t in ins):
            return  # moving an external tensor: its grid tag (if any) was propagated
        for o in tree_flatten(out)[0]:
            if isinstance(o, Tensor):
                region.produced[id(o)] = o

    def _where(self) -> str:
        return self.mod_stack[-1] if self.mod_stack else ""

    def _violate(self, op: str, path: str, detail: str) -> None:
        if len(self.violations) < self.max_violations:
            self.violations.append(Violation(op, path, detail))


def _same_per_tensor(g: Grid, g0: Grid) -> bool:
    return (g.scale.numel() == 1 and g0.scale.numel() == 1 and g.qmin == g0.qmin and g.qmax == g0.qmax
            and bool(g.scale.reshape(()) == g0.scale.reshape(()))
            and bool(g.zero_point.reshape(()) == g0.zero_point.reshape(())))


def _swap(obj, old: Tensor, new: Tensor):
    if obj is old:
        return new
    if isinstance(obj, (list, tuple)):
        return type(obj)(_swap(o, old, new) for o in obj)
    if isinstance(obj, dict):
        return {k: _swap(v, old, new) for k, v in obj.items()}
    return obj


def _macs(name: str, args, out) -> int:
    if name not in MAC_OPS:
        return 0
    o = tree_flatten(out)[0][0]
    if name in ("convolution", "_convolution"):
        w = args[1]
        return int(o.numel() * w.shape[1] * (w[0, 0].numel()))
    a = args[1] if name in ("addmm", "baddbmm") else args[0]
    return int(o.numel() * a.shape[-1])


def audit(model: nn.Module, batches: Iterable[Any], run=None) -> AuditReport:
    """Run each batch (args tuple, kwargs dict or callable ``f(model)``) under the auditor."""
    from .replace import run_model

    runner = run or run_model
    was_training = model.training
    model.eval()
    aud = Auditor(model)
    try:
        with torch.no_grad(), aud:
            for b in batches:
                runner(model, b)
    finally:
        model.train(was_training)
    return aud.report()
