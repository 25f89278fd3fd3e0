"""``quantize_model``: swap modules for quantized twins and route functional ops through wrappers."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn

from .modules import (OP_CLASSES, QConv1d, QConv2d, QEmbedding, QGELU, QGLU, QLayerNorm, QLinear,
                      QLogSoftmax, QMaxPool, QModule, QMultiheadAttention, QReLU, QSiLU, QSoftmax)
from .quantizer import Quantizer
from .recipe import Recipe, RecipeError, load_recipe
from .routing import RoutingState, UnsupportedOpError

# float module type -> quantized twin (subclasses, e.g. whisper's Linear(nn.Linear), match too)
MODULE_MAP: Tuple[Tuple[Type[nn.Module], Type[QModule]], ...] = (
    (nn.Linear, QLinear), (nn.Conv1d, QConv1d), (nn.Conv2d, QConv2d), (nn.Embedding, QEmbedding),
    (nn.LayerNorm, QLayerNorm), (nn.Softmax, QSoftmax), (nn.LogSoftmax, QLogSoftmax), (nn.GELU, QGELU),
    (nn.ReLU, QReLU), (nn.SiLU, QSiLU), (nn.GLU, QGLU), (nn.MaxPool1d, QMaxPool), (nn.MaxPool2d, QMaxPool),
    (nn.MultiheadAttention, QMultiheadAttention))


def _twin(m: nn.Module) -> Optional[Type[QModule]]:
    for float_cls, q_cls in MODULE_MAP:
        if isinstance(m, float_cls):
            return q_cls
    return None


def quantize_model(model: nn.Module, recipe: Union[str, Mapping, Recipe],
                   example_inputs: Optional[Union[tuple, dict, Callable[[nn.Module], Any]]] = None,
                   strict: bool = True, methods: Sequence[str] = ()) -> nn.Module:
    """Quantize ``model`` in place and return it.

    Swaps every module with a quantized twin, hooks every other module so functional ops inside its
    forward are routed through quantized wrapper submodules (also when a caller runs ``module.forward(...)``
    directly: that re-enters through ``module(...)``). ``methods`` names other methods that callers invoke
    directly and that compute, as dotted paths (``"decoder.get_normalized_probs"``): their ops are routed
    too, to wrappers under a container ``qasr_<method>`` of the owner. With ``example_inputs`` (args tuple,
    kwargs dict, or a callable ``f(model)`` that runs it), runs one forward (quantization disabled)
    to create all wrappers and check recipe patterns. Strict mode raises UnsupportedOpError for
    anything it cannot quantize; permissive mode records it in ``model.qasr_problems``.
    Afterwards run :func:`calibrate` before using the model.
    """
    recipe = load_recipe(recipe)
    problems: List[Tuple[str, str]] = []

    def fail(op: str, path: str, why: str) -> None:
        msg = f"cannot quantize {op} at '{path or '<root>'}': {why}"
        if strict:
            raise UnsupportedOpError(msg)
        problems.append((op, path))
        print(f"[quant] permissive: {msg}")

    for path, m in list(model.named_modules()):
        for name, child in list(m.named_children()):
            cpath = f"{path}.{name}" if path else name
            if isinstance(child, (QModule, QMultiheadAttention)):
                continue
            cls = _twin(child)
            if cls is None:
                continue
            try:
                if cls is QMultiheadAttention:  # composite: one config per inner op
                    q = cls.from_float(child, lambda sub, op, p=cpath: recipe.config_for(f"{p}.{sub}", op))
                else:
                    q = cls.from_float(child, recipe.config_for(cpath, cls.op_type))
            except NotImplementedError as e:
                fail(type(child).__name__, cpath, str(e))
                continue
            q.train(child.training)
            setattr(m, name, q)
            for sub, qm in q.named_modules():  # paths for error messages
                qm.qasr_path = f"{cpath}.{sub}" if sub else cpath

    # Modules without a twin (containers, third-party blocks, raw nn.Parameter users such as whisper's
    # positional_embedding) keep their forward: every torch op it calls is routed or refused below.
    def factory(path: str, op_type: str) -> QModule:
        w = OP_CLASSES[op_type](recipe.config_for(path, op_type))
        w.qasr_path = path
        _sync_state(w, state)
        return w

    for dotted in methods:
        route_method(model, dotted)
    state = RoutingState(model, factory, strict=strict)
    state.problems.extend(problems)
    state.quant_enabled, state.observing = True, False
    _install(model, state)
    model.qasr_routing = state
    model.qasr_recipe = recipe
    model.qasr_methods = list(methods)
    model.qasr_problems = state.problems

    if example_inputs is not None:
        with torch.no_grad():
            set_quantization(model, False)
            try:
                run_model(model, example_inputs)
            finally:
                set_quantization(model, True)
        unmatched = recipe.unmatched([p for p, m in model.named_modules() if isinstance(m, QModule)])
        if unmatched:
            raise RecipeError(f"{recipe.source}: overrides pattern(s) {unmatched} match no quantized module")
    return model


def _install(model: nn.Module, state: RoutingState) -> None:
    for path, m in model.named_modules():
        state.paths[id(m)] = path
        if getattr(m, "_qasr_hooked", False):
            continue
        if isinstance(m, QModule):
            m.register_forward_pre_hook(state.opaque_pre)
            m.register_forward_hook(state.opaque_post, always_call=True)
        elif isinstance(m, Quantizer):
            continue
        else:
            m.register_forward_pre_hook(state.pre_hook)
            m.register_forward_hook(state.post_hook, always_call=True)
            m._qasr_routing = state
            m.forward = _ReenteringForward(m, m.__dict__.get("forward"))
        m._qasr_hooked = True


class _ReenteringForward:
    """The ``forward`` of every module :func:`quantize_model` hooks. A caller that runs ``module.forward(...)``
    directly skips the module's hooks (fairseq's search does: ``encoder.forward_torchscript`` ends in
    ``self.forward(...)``, ``SequenceGenerator`` calls ``decoder.forward(...)``), and the ops of that forward itself
    would run unrouted, in float; this re-enters through ``module(...)``. Survives ``copy.deepcopy``."""

    def __init__(self, module: nn.Module, inner: Optional[Callable] = None):
        self.module = module
        self.inner = inner  # an instance-level forward that was already set, else the class's is used

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        m = self.module
        if called_without_hooks(m):
            return m(*args, **kwargs)
        return (self.inner or type(m).forward.__get__(m))(*args, **kwargs)


class RoutedMethod(nn.Module):
    """Runs ``owner.<method>`` as a module call, so that the ops it computes are routed to wrappers under this
    module (for methods callers invoke directly besides ``forward``, e.g. fairseq's ``get_normalized_probs``)."""

    def __init__(self, owner: nn.Module, method: str):
        super().__init__()
        self.__dict__["owner"] = owner  # not a submodule: no cycle in named_modules()
        self.method = method

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(type(self.owner), self.method)(self.owner, *args, **kwargs)


def route_method(model: nn.Module, dotted: str) -> RoutedMethod:
    """Make ``model.<dotted>`` (``"decoder.get_normalized_probs"``) run through a :class:`RoutedMethod`
    registered as ``qasr_<method>`` on its owner (call before the model is hooked)."""
    owner_path, _, name = dotted.rpartition(".")
    try:
        owner = model.get_submodule(owner_path) if owner_path else model
    except AttributeError as e:
        raise ValueError(f"methods: no module '{owner_path}' for '{dotted}'") from e
    if not callable(getattr(type(owner), name, None)) or name == "forward":
        raise ValueError(f"methods: '{dotted}' is not a method (other than forward) of {type(owner).__name__}")
    routed = RoutedMethod(owner, name)
    owner.add_module(f"qasr_{name}", routed)
    object.__setattr__(owner, name, routed)  # the instance attribute shadows the class's method
    return routed


def called_without_hooks(module: nn.Module) -> bool:
    """True when ``module``'s ``forward`` runs without its routing hooks: called as ``module.forward(...)``
    (fairseq's search calls ``encoder.forward_torchscript`` and ``decoder.forward`` so) instead of ``module(...)``.
    Its own ops (a positional add) would then run unrouted, in float; its ``forward`` must re-enter through
    ``module(...)``. False for modules :func:`quantize_model` did not hook."""
    st = getattr(module, "_qasr_routing", None)
    return st is not None and not any(m is module for m in st.stack)


def run_model(model: nn.Module, inputs: Any) -> Any:
    if callable(inputs):
        return inputs(model)
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _sync_state(m: nn.Module, state: RoutingState) -> None:
    for q in m.modules():
        if isinstance(q, Quantizer):
            q.enabled, q.observing = state.quant_enabled, state.observing


def quantizers(model: nn.Module) -> List[Tuple[str, Quantizer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Quantizer)]


def set_quantization(model: nn.Module, enabled: bool) -> None:
    """Enable (True) or bypass (False: the exact float model) every quantizer."""
    st = getattr(model, "qasr_routing", None)
    if st is not None:
        st.quant_enabled = enabled
    for _, q in quantizers(model):
        q.enabled = enabled


def set_observing(model: nn.Module, observing: bool) -> None:
    st = getattr(model, "qasr_routing", None)
    if st is not None:
        st.observing = observing
    for _, q in quantizers(model):
        q.observing = observing


def calibrate(model: nn.Module, batches, reset: bool = False) -> nn.Module:
    """Run observers on ``batches`` (each an args tuple, kwargs dict or callable) with quantization on."""
    if reset:
        for _, q in quantizers(model):
            q.initialized.fill_(False)
    was_training = model.training
    model.eval()
    set_quantization(model, True)
    set_observing(model, True)
    try:
        with torch.no_grad():
            for b in batches:
                run_model(model, b)
    finally:
        set_observing(model, False)
        model.train(was_training)
    return model


def uncalibrated(model: nn.Module) -> List[str]:
    """Paths of quantized ops none of whose quantizers has a range yet: call sites the calibration
    data never reached (they raise NotCalibratedError when run)."""
    return [n for n, m in model.named_modules() if isinstance(m, QModule)
            and m.quantizers() and not any(bool(q.initialized) for q in m.quantizers())]


def freeze_wrappers(model: nn.Module, frozen: bool = True) -> None:
    """After discovery: refuse to create new wrappers (a call site not seen before raises)."""
    model.qasr_routing.allow_create = not frozen


def materialize_wrappers(model: nn.Module, state_dict: Mapping[str, Any]) -> List[str]:
    """Create the routed wrappers named in a saved ``state_dict`` (so that it loads without a
    discovery forward). Returns the created paths."""
    st: RoutingState = model.qasr_routing
    made = []
    for key in state_dict:
        parts = key.split(".")
        for i, part in enumerate(parts):
            op, _, k = part.rpartition("_")
            if op in OP_CLASSES and k.isdigit():
                owner_path = ".".join(parts[:i])
                owner = model.get_submodule(owner_path) if owner_path else model
                if part not in owner._modules and not isinstance(owner, QModule):
                    path = f"{owner_path}.{part}" if owner_path else part
                    w = st.factory(path, op)
                    ref = next(owner.parameters(), None)
                    if ref is not None:
                        w.to(ref.device)
                    owner.add_module(part, w)
                    made.append(path)
                break
    if made:
        _install(model, st)
    return made


def quant_checkpoint_state(model: nn.Module) -> Dict[str, Any]:
    """What a checkpoint needs besides ``model.state_dict()`` to rebuild the quantized model:
    ``{"recipe": <recipe dict>, "methods": [...]}`` (store it under ``state["qasr_quant"]``; pass both back to
    :func:`quantize_model`; wrappers are recreated from the state_dict keys by :func:`materialize_wrappers`)."""
    return {"recipe": model.qasr_recipe.to_dict(), "version": model.qasr_recipe.version,
            "methods": list(getattr(model, "qasr_methods", []))}
