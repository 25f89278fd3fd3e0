"""Build and load the C kernels (``csrc/qgemm_avx2.c``) and register them as torch ops.

The library is compiled on first use with the system C compiler (``-O3 -mavx2 -mfma -fopenmp``) into a cache
directory (``QASR_CACHE``, default ``~/.cache/fairseq_qasr``), keyed by the source's hash, written atomically.
:func:`available` is False (callers take the numba/torch paths) where the CPU lacks AVX2, no compiler is found, the
build fails (a warning says why) or ``QASR_CGEMM=0``. Each kernel is registered as a ``qasr::*_avx2`` torch op through
``torch.library.Library`` (~15 us a call; ``custom_op`` costs ~55 us), so the engine's integer-only dispatch check sees
it run with its integer dtypes.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

SRC = Path(__file__).parent / "csrc" / "qgemm_avx2.c"
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-fPIC", "-shared"]
NR = 16  # columns per packed panel (the C tile width)
MR = 4  # rows per C tile
_LIB: Optional[ctypes.CDLL] = None
_TRIED = False


def _cpu_has_avx2() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx2" in line for line in f)
    except OSError:
        return False


def _build() -> Optional[ctypes.CDLL]:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    src = SRC.read_bytes()
    key = hashlib.sha256(src + " ".join(FLAGS).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("QASR_CACHE", Path.home() / ".cache" / "fairseq_qasr"))
    lib = cache / f"qgemm_avx2-{key}.so"
    if not lib.exists():
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        res = subprocess.run([cc, *FLAGS, str(SRC), "-o", tmp], capture_output=True, text=True)
        if res.returncode != 0:
            os.unlink(tmp)
            warnings.warn(f"fairseq_qasr: could not build {SRC.name} ({cc}): {res.stderr.strip()[:500]}")
            return None
        os.replace(tmp, lib)  # atomic: concurrent processes never load a half-written library
    dll = ctypes.CDLL(str(lib))
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p
    dll.qasr_pack.argtypes = [ptr, ctypes.c_int, i64, i64, i64, i64, ctypes.c_int, ptr, i64, i64, ptr]
    dll.qasr_pack.restype = None
    dll.qasr_pack_batch.argtypes = [ptr, ctypes.c_int, i64, i64, i64, i64, i64, ctypes.c_int, ptr, i64, i64, i64, ptr,
                                    i64, ctypes.c_int]
    dll.qasr_pack_batch.restype = None
    dll.qasr_pack_bytes.argtypes = [ptr, i64, i64, i64, i64, i64, ptr, i64, i64, i64, ctypes.c_int]
    dll.qasr_pack_bytes.restype = None
    dll.qasr_qgemm.argtypes = [ptr, ctypes.c_int, i64, i32, ctypes.c_int, i64, i64, ptr, i64, i64, i64, i64, ptr, ptr,
                               i64, ctypes.c_int, ptr, ptr, ptr, i64, ptr, ptr, ptr, ptr, ptr, ctypes.c_int, i64, i64,
                               i64, ptr, ctypes.c_int, i64, ptr, ctypes.c_int, ctypes.c_int]
    dll.qasr_qgemm.restype = None
    dll.qasr_byte_way_blocks.argtypes = [ptr]
    dll.qasr_byte_way_blocks.restype = None
    dll.qasr_attention.argtypes = [ptr, i64, i64, i64, ptr, i64, i64, i64, ptr, i64, i64, i64, ctypes.c_int, i64, i64,
                                   i64, ptr, i64, ctypes.c_int, i64, i64, i64, ptr, i64, i64, ctypes.c_int,
                                   i64, i64, ctypes.c_int, i64, i64, i64,
                                   ptr, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ctypes.c_int]
    dll.qasr_attention.restype = None
    dll.qasr_isqrt.argtypes = [ptr, ptr, i64]
    dll.qasr_layer_norm.argtypes = [ptr, ctypes.c_int, i64, i64, ptr, ptr, i64, ctypes.c_int, ctypes.c_int, ptr,
                                    ctypes.c_int]
    dll.qasr_layer_norm_exact.argtypes = [ptr, ctypes.c_int, i64, i64, ptr, ptr, ptr, ptr, i64, i64, i64, ptr,
                                          ctypes.c_int, ctypes.c_int]
    dll.qasr_layer_norm_exact.restype = None
    dll.qasr_softmax_exact.argtypes = [ptr, ctypes.c_int, i64, i64, ptr, i64, ptr, i64, i64, ctypes.c_int, i64, i64, i64,
                                       ptr, ctypes.c_int, ctypes.c_int]
    dll.qasr_softmax_exact.restype = None
    dll.qasr_ln_vector.argtypes = [ctypes.c_int]
    dll.qasr_ln_vector.restype = None
    dll.qasr_lut.argtypes = [ptr, ctypes.c_int, i64, i64, ptr, ctypes.c_int, i64, ptr, ctypes.c_int]
    dll.qasr_lut.restype = i64
    dll.qasr_add.argtypes = [ptr, ctypes.c_int, i64, i64, ptr, ctypes.c_int, i64, i64, i64, ptr, ctypes.c_int]
    dll.qasr_add_requant.argtypes = [ptr, ctypes.c_int, ptr, ctypes.c_int, i64, i64, i64, i64, i64, i64, i64, i64, i64,
                                     i64, i64, i64, i64, ptr, ptr, ctypes.c_int, ctypes.c_int]
    dll.qasr_add_requant.restype = None
    dll.qasr_requant.argtypes = [ptr, ctypes.c_int, i64, i64, i64, ptr, ptr, ptr, ctypes.c_int, i64, i64, i64, ptr,
                                 ctypes.c_int, ctypes.c_int]
    for f in (dll.qasr_isqrt, dll.qasr_layer_norm, dll.qasr_add, dll.qasr_requant):
        f.restype = None
    if dll.qasr_mr() != MR:
        raise RuntimeError(f"{lib}: tile height {dll.qasr_mr()} != {MR}")
    return dll


def available() -> bool:
    """Whether the C kernels run here (built and loaded once per process)."""
    global _LIB, _TRIED
    if not _TRIED:
        _TRIED = True
        if os.environ.get("QASR_CGEMM", "1") != "0" and _cpu_has_avx2():
            _LIB = _build()
    return _LIB is not None


TYPES = {torch.int8: 0, torch.int16: 1, torch.int32: 2}
# torch ops (seen by the integer-only dispatch check); Library.impl costs ~15 us a call, custom_op ~55 us
_OPS = torch.library.Library("qasr", "FRAGMENT")


def op(schema: str):
    """Register the decorated function as the CPU kernel of ``qasr::<schema>``; returns the op."""
    name = schema.split("(", 1)[0]

    def deco(fn):
        _OPS.define(schema)
        _OPS.impl(name, fn, "CPU")
        return getattr(torch.ops.qasr, name)
    return deco


def dll() -> ctypes.CDLL:
    """The loaded library; a clear error where the kernels are not available."""
    if not available():
        raise RuntimeError("fairseq_qasr C kernels are not available on this machine (no AVX2 CPU, no C compiler, a "
                           "failed build or QASR_CGEMM=0; see fairseq_qasr.integer.cbuild.available)")
    return _LIB


NONE32, NONE64 = torch.empty(0, dtype=torch.int32), torch.empty(0, dtype=torch.int64)


def codes(t: Tensor) -> Tensor:
    """Integer codes in a dtype the kernels read (int8, int16, int32; wider or unsigned ones as int32)."""
    return t if t.dtype in TYPES else t.int()
