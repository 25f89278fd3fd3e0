"""Route functional ops called inside arbitrary modules through quantized wrapper submodules.

While a hooked model runs, a TorchFunctionMode intercepts torch functions and tensor methods. Each
compute op (softmax, matmul/bmm/@, + - *, / by a number, gelu/relu/silu/glu, layer_norm, conv, embedding,
linear, max-pool, scaled_dot_product_attention (decomposed)) is sent to a quantized wrapper registered
on the module whose forward is running, named ``<op>_<k>``: the k-th call of that op type during one
forward of that module. Names are therefore stable across full-sequence and incremental decoding as
long as the module calls the same ops in the same order. Additive attention masks (tensors whose
values are only 0 and -inf) are applied as ``masked_fill`` (a select), not as a quantized add, and do
not consume a wrapper index.
"""
from __future__ import annotations

import math
from numbers import Number
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .audit_state import TensorSet, index_derived
from .modules import OP_CLASSES, QModule
from .op_tables import FLOAT_COMPUTE, PASSTHROUGH


class UnsupportedOpError(RuntimeError):
    """A compute op the quantizer cannot route (strict mode); names the op and the module path."""


def func_name(func: Callable) -> str:
    name = getattr(func, "__name__", None) or repr(func)
    return name


class RoutingState:
    """Book-keeping shared by the hooks and the function mode of one quantized model."""

    def __init__(self, root: nn.Module, factory: Callable[[str, str], QModule], strict: bool = True):
        self.root = root
        self.factory = factory  # (path, op_type) -> new wrapper
        self.strict = strict
        self.allow_create = True
        self.paths: Dict[int, str] = {}
        self.stack: List[nn.Module] = []
        self.counters: Dict[int, Dict[str, int]] = {}
        self.problems: List[Tuple[str, str]] = []  # (op, module path)
        self.created: List[str] = []
        self.opaque = 0
        self.mode: Optional[_Router] = None
        self.derived = TensorSet()  # float tensors computed from integer metadata only

    def path_of(self, m: nn.Module) -> str:
        if id(m) not in self.paths:  # e.g. after copy.deepcopy of the model: re-index
            self.paths = {id(mm): p for p, mm in self.root.named_modules()}
        return self.paths.get(id(m), "?")

    def current_path(self) -> str:
        return self.path_of(self.stack[-1]) if self.stack else ""

    def problem(self, op: str, hint: str = "") -> None:
        path = self.current_path() or "<root>"
        msg = f"cannot quantize op '{op}' in module '{path}'" + (f": {hint}" if hint else "")
        if self.strict:
            raise UnsupportedOpError(msg)
        if (op, path) not in self.problems:
            self.problems.append((op, path))
            print(f"[quant] permissive: {msg}")

    def wrapper(self, op_type: str) -> QModule:
        owner = self.stack[-1]
        counts = self.counters.setdefault(id(owner), {})
        k = counts.get(op_type, 0)
        counts[op_type] = k + 1
        name = f"{op_type}_{k}"
        mod = owner._modules.get(name)
        if mod is None:
            if hasattr(owner, name):
                raise UnsupportedOpError(f"module '{self.current_path()}' already has an attribute '{name}'")
            path = f"{self.current_path()}.{name}" if self.current_path() else name
            if not self.allow_create:
                raise UnsupportedOpError(
                    f"op '{op_type}' in module '{self.current_path()}' has no wrapper '{name}'; run "
                    "quantize_model with example_inputs that exercise this code path")
            mod = self.factory(path, op_type)
            ref = next(owner.parameters(), None)
            ref = next(owner.buffers(), None) if ref is None else ref
            ref = next(self.root.parameters(), None) if ref is None else ref  # e.g. a RoutedMethod container
            if ref is not None:
                mod.to(ref.device)
            owner.add_module(name, mod)
            self.paths[id(mod)] = path
            for sub_name, sub in mod.named_modules():
                if sub_name:
                    self.paths[id(sub)] = f"{path}.{sub_name}"
            self.created.append(path)
        elif not isinstance(mod, QModule) or mod.op_type != op_type:
            raise UnsupportedOpError(f"'{self.current_path()}.{name}' is not a quantized {op_type} wrapper")
        return mod

    # hooks ------------------------------------------------------------------------------------
    def pre_hook(self, module: nn.Module, args: Any) -> None:
        if not self.stack:
            self.mode = _Router(self)
            self.mode.__enter__()
        self.stack.append(module)
        self.counters[id(module)] = {}

    def post_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.stack and self.stack[-1] is module:
            self.stack.pop()
        if not self.stack and self.mode is not None:
            mode, self.mode = self.mode, None
            mode.__exit__(None, None, None)

    def opaque_pre(self, module: nn.Module, args: Any) -> None:
        self.opaque += 1

    def opaque_post(self, module: nn.Module, args: Any, output: Any) -> None:
        self.opaque -= 1


class _Router(TorchFunctionMode):
    def __init__(self, state: RoutingState):
        super().__init__()
        self.state = state

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        st = self.state
        if st.opaque > 0 or not st.stack:
            return func(*args, **kwargs)
        name = func_name(func)
        flat = [a for a in _flatten((args, kwargs)) if isinstance(a, Tensor)]
        if index_derived(flat, st.derived) or (flat and not any(t.is_floating_point() for t in flat)):
            # integer tensors only, or floats computed from them alone (lengths, positions): integer
            # arithmetic by nature; float results (lengths.float(), lengths * 0.5) stay "derived"
            out = func(*args, **kwargs)
            for o in _flatten(out):
                if isinstance(o, Tensor) and o.is_floating_point():
                    st.derived.add(o)
            return out
        handler = HANDLERS.get(name)
        if handler is not None:
            out = handler(st, name, args, kwargs)
            if out is not NotImplemented:
                return out
            return func(*args, **kwargs)
        if name in PASSTHROUGH:
            return func(*args, **kwargs)
        st.problem(name, "float compute with no quantized twin" if name in FLOAT_COMPUTE
                   else "unclassified op (add it to a quantized wrapper or to the data-movement list)")
        return func(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
def _flatten(obj):
    from torch.utils._pytree import tree_flatten
    return tree_flatten(obj)[0]


def _is_float(x: Any) -> bool:
    return isinstance(x, Tensor) and x.is_floating_point()


def _is_mask(t: Any) -> bool:
    """An additive attention mask: a float tensor holding only 0 and -inf that is not a trainable
    parameter (an all-zero slice of a causal mask, e.g. at one incremental decoding step, counts)."""
    return (_is_float(t) and not t.requires_grad and t.numel() > 0
            and bool((torch.isneginf(t) | (t == 0)).all()))


def _inplace(name: str) -> bool:
    return name.endswith("_") and not name.startswith("__") or name.startswith("__i")


def _finish(name: str, a: Any, out: Tensor) -> Tensor:
    if _inplace(name) and isinstance(a, Tensor):
        with torch.no_grad() if not a.requires_grad else _nullctx():
            a.copy_(out)
        return a
    return out


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _binary(op_type: str) -> Callable:
    def handle(st: RoutingState, name: str, args, kwargs):
        a, b = args[0], args[1] if len(args) > 1 else kwargs.get("other")
        alpha = kwargs.get("alpha", 1)
        if not (_is_float(a) or _is_float(b)):
            return NotImplemented  # integer arithmetic (positions, lengths): already integer
        if alpha != 1:
            st.problem(f"{name}(alpha={alpha})")
            return NotImplemented
        reverse = name.startswith("__r")
        if op_type in ("add", "sub") and not reverse:
            for x, y in ((a, b), (b, a)) if op_type == "add" else ((a, b),):
                if _is_mask(y) and isinstance(x, Tensor) and torch.broadcast_shapes(x.shape, y.shape) == x.shape:
                    return _finish(name, a, x.masked_fill(torch.isneginf(y), float("-inf")))
        if op_type == "div":
            if isinstance(b, Tensor) or reverse or not isinstance(b, Number):
                st.problem(name, "division by a tensor")
                return NotImplemented
            return _finish(name, a, st.wrapper("mul")(a, 1.0 / b))
        if isinstance(a, Tensor) and isinstance(b, Tensor) and not (_is_float(a) and _is_float(b)):
            st.problem(name, "mixed integer/float operands")
            return NotImplemented
        return _finish(name, a, st.wrapper(op_type)(a, b, reverse=reverse))
    return handle


def _matmul(st, name, args, kwargs):
    a, b = args[0], args[1] if len(args) > 1 else kwargs.get("other", kwargs.get("mat2"))
    if kwargs.get("out") is not None:
        st.problem(f"{name}(out=...)")
    if name == "__rmatmul__":
        a, b = b, a
    return st.wrapper("matmul")(a, b)


def _unary(op_type: str, arg_names: Tuple[str, ...] = ()) -> Callable:
    def handle(st, name, args, kwargs):
        x, rest = args[0], list(args[1:])
        kw = dict(kwargs)
        for i, v in enumerate(rest):
            kw[arg_names[i]] = v
        kw.pop("inplace", None)
        if op_type in ("softmax", "log_softmax"):
            for key in ("_stacklevel", "dtype"):
                v = kw.pop(key, None)
                if isinstance(v, torch.dtype):
                    x = x.to(v)
        w = st.wrapper(op_type)
        if op_type == "max_pool":
            w.nd = 1 if name == "max_pool1d" else 2
        return _finish(name, x, w(x, **kw))
    return handle


def _weighted(op_type: str, arg_names: Tuple[str, ...]) -> Callable:
    def handle(st, name, args, kwargs):
        kw = dict(zip(arg_names, args))
        kw.update(kwargs)
        x = kw.pop(arg_names[0])
        if op_type == "embedding":  # F.embedding(input, weight, padding_idx, max_norm, ...)
            if kw.get("max_norm") is not None:
                st.problem("embedding(max_norm)")
            w = kw.pop("weight")
            return st.wrapper(op_type)(x, w, **{k: v for k, v in kw.items() if k != "max_norm"})
        if op_type == "layer_norm":
            return st.wrapper(op_type)(x, kw.get("normalized_shape"), kw.get("weight"), kw.get("bias"),
                                       kw.get("eps", 1e-5))
        w, b = kw.pop("weight"), kw.pop("bias", None)
        return st.wrapper(op_type)(x, w, b, **kw)
    return handle


def _sdpa(st, name, args, kwargs):
    """scaled_dot_product_attention decomposed into quantized matmul, mul, (mask), softmax, matmul."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    kw = dict(zip(names, args))
    kw.update(kwargs)
    q, k, v = kw["query"], kw["key"], kw["value"]
    if kw.get("dropout_p", 0.0) not in (0, 0.0) or kw.get("enable_gqa", False):
        st.problem(name, "dropout_p / enable_gqa are not supported")
    scale = kw.get("scale") or 1.0 / math.sqrt(q.shape[-1])
    scores = st.wrapper("matmul")(q, k.transpose(-2, -1))
    scores = st.wrapper("mul")(scores, float(scale))
    mask = kw.get("attn_mask")
    if kw.get("is_causal"):
        L, S = q.shape[-2], k.shape[-2]
        causal = torch.ones(L, S, dtype=torch.bool, device=q.device).tril(diagonal=0)
        scores = scores.masked_fill(~causal, float("-inf"))
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        elif _is_mask(mask) or not bool(mask.any()):
            scores = scores.masked_fill(torch.isneginf(mask), float("-inf"))
        else:
            scores = st.wrapper("add")(scores, mask)
    probs = st.wrapper("softmax")(scores, dim=-1)
    return st.wrapper("matmul")(probs, v)


HANDLERS: Dict[str, Callable] = {}
for _n in ("add", "__add__", "__radd__", "__iadd__", "add_"):
    HANDLERS[_n] = _binary("add")
for _n in ("sub", "__sub__", "__rsub__", "__isub__", "sub_", "subtract"):
    HANDLERS[_n] = _binary("sub")
for _n in ("mul", "__mul__", "__rmul__", "__imul__", "mul_", "multiply"):
    HANDLERS[_n] = _binary("mul")
for _n in ("div", "__truediv__", "__itruediv__", "div_", "true_divide", "__rtruediv__", "divide"):
    HANDLERS[_n] = _binary("div")
for _n in ("matmul", "__matmul__", "__rmatmul__", "bmm"):
    HANDLERS[_n] = _matmul
HANDLERS.update({
    "softmax": _unary("softmax", ("dim", "_stacklevel", "dtype")),
    "log_softmax": _unary("log_softmax", ("dim", "_stacklevel", "dtype")),
    "gelu": _unary("gelu"), "relu": _unary("relu"), "relu_": _unary("relu"), "silu": _unary("silu"),
    "glu": _unary("glu", ("dim",)),
    "mean": _unary("mean", ("dim", "keepdim")), "sum": _unary("sum", ("dim", "keepdim")),
    "max_pool1d": _unary("max_pool", ("kernel_size", "stride", "padding", "dilation", "ceil_mode")),
    "max_pool2d": _unary("max_pool", ("kernel_size", "stride", "padding", "dilation", "ceil_mode")),
    "linear": _weighted("linear", ("input", "weight", "bias")),
    "conv1d": _weighted("conv1d", ("input", "weight", "bias", "stride", "padding", "dilation", "groups")),
    "conv2d": _weighted("conv2d", ("input", "weight", "bias", "stride", "padding", "dilation", "groups")),
    "embedding": _weighted("embedding", ("input", "weight", "padding_idx", "max_norm", "norm_type",
                                         "scale_grad_by_freq", "sparse")),
    "layer_norm": _weighted("layer_norm", ("input", "normalized_shape", "weight", "bias", "eps")),
    "scaled_dot_product_attention": _sdpa,
})
assert all(op in OP_CLASSES for op in ("add", "sub", "mul", "matmul", "softmax", "gelu", "layer_norm"))
