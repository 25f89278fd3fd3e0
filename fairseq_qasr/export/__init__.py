"""Deployable export of quantized models: bit packing, safetensors + JSON header (docs/export.md)."""
from .format import export_model, load_engine, model_options, read_header, save_engine, size_report
from .packing import code_range, pack_codes, packed_nbytes, unpack_codes

__all__ = ["export_model", "load_engine", "read_header", "save_engine", "size_report", "model_options",
           "pack_codes", "unpack_codes", "packed_nbytes", "code_range"]
