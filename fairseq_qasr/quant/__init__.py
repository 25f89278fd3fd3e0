"""Honest low-bit quantization in plain torch (no fairseq imports).

Public API: :func:`quantize_model`, :func:`calibrate`, :func:`set_quantization`, :func:`load_recipe`,
:func:`audit` (see docs/quantization.md).
"""
from .affine import fake_quantize, qparams_from_range
from .audit import AuditReport, Auditor, audit
from .audit_state import Grid
from .modules import OP_CLASSES, QConfig, QModule, QMultiheadAttention
from .qtype import QSpec, SpecError
from .quantizer import AccumulatorOverflowError, NotCalibratedError, Quantizer
from .recipe import Recipe, RecipeError, load_recipe, recipe_from_dict
from .replace import (called_without_hooks, calibrate, freeze_wrappers, materialize_wrappers, quant_checkpoint_state,
                      quantize_model, route_method, run_model, set_observing, set_quantization, uncalibrated)
from .routing import UnsupportedOpError

__all__ = [
    # specs and primitives
    "QSpec", "SpecError", "Quantizer", "NotCalibratedError", "AccumulatorOverflowError", "fake_quantize", "qparams_from_range", "Grid",
    # modules
    "QConfig", "QModule", "QMultiheadAttention", "OP_CLASSES",
    # recipes
    "Recipe", "RecipeError", "load_recipe", "recipe_from_dict",
    # model-level tools
    "quantize_model", "called_without_hooks", "calibrate", "set_quantization", "set_observing", "uncalibrated", "freeze_wrappers",
    "materialize_wrappers", "quant_checkpoint_state", "route_method", "run_model", "UnsupportedOpError",
    # honesty audit
    "audit", "Auditor", "AuditReport",
]
