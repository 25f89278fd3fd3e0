"""The deployable file: safetensors tensors + one JSON header (``__metadata__["qasr"]``).

See docs/export.md for the format. Writer: :func:`export_model` (fake-quantized model -> file) and
:func:`save_engine`; reader: :func:`load_engine` (file -> :class:`fairseq_qasr.integer.IntegerEngine`) and
:func:`read_header`.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Dict, Optional

import torch
from torch import Tensor

from ..integer.engine import IntegerEngine
from .packing import pack_codes, packed_nbytes, unpack_codes

FORMAT = "fairseq-qasr-integer"
VERSION = 5  # 5: two-word (62-bit) requantization multipliers from the exact scale ratios (``rq:<q>.m`` int64 >= 2^31;
#              ``rqa:`` [ma, ta, mb, tb, shift, la, lb]; ``gq:<q>.rl/.bl/.ls``), LayerNorms straight onto each
#              consumer's grid (``lnq:``); 4: grouped Linears' consumer multipliers folded into their group ratios
#              (``gq:``/``rqg:``); 3: LayerNorm
#              with 24 fraction bits (``ln:`` meta ``frac``); 2: residual adds of 16-bit codes requantized per consumer
#              (``rqa:`` constants); 1-4 still read
READABLE_VERSIONS = (1, 2, 3, 4, 5)
PACKED_PREFIXES = ("w:", "lng:")  # integer weights / LayerNorm gains, stored at their recipe width


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Tensor):
        return x.tolist()
    if isinstance(x, (bool, int, float, str)) or x is None:
        return x
    return str(x)


def model_options(cfg: Any) -> Dict[str, Any]:
    """The ``qtransformer_conv`` options as a plain dict (from a fairseq model cfg, a Namespace or a dict)."""
    from omegaconf import OmegaConf
    if OmegaConf.is_config(cfg):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    d = dict(cfg) if isinstance(cfg, dict) else dict(vars(cfg))
    if d.get("encoder_frontend") is None:
        raise ValueError("not qtransformer_conv options (no encoder_frontend)")
    return {k: v for k, v in d.items() if not k.startswith("_")}


def export_model(model: torch.nn.Module, out: str, cfg: Optional[Dict[str, Any]] = None,
                 recipe: Any = None, example_len: int = 64) -> Dict[str, Any]:
    """Compile a fake-quantized, calibrated ``qtransformer_conv`` into the integer engine and write ``out``.
    Returns the header. ``recipe``: a name or Recipe (default: ``model.qasr_recipe``)."""
    if cfg is None:
        cfg = getattr(model, "qasr_cfg", None)
    if cfg is None:
        raise ValueError("export_model needs the model options (cfg=...)")
    cfg = model_options(cfg)
    engine = IntegerEngine.from_quantized(model.eval(), cfg, example_len=example_len)
    recipe = recipe if recipe is not None else getattr(model, "qasr_recipe", None)
    if recipe is not None and hasattr(recipe, "to_dict"):
        recipe = recipe.to_dict()
    return save_engine(engine, out, recipe)


def save_engine(engine: IntegerEngine, out: str, recipe: Any = None) -> Dict[str, Any]:
    tensors: Dict[str, Tensor] = {}
    packed: Dict[str, Any] = {}
    weight_bits: Dict[str, int] = {}
    for key, t in engine.t.items():
        if key == "pos:encoder" and engine.meta.get("pos:encoder") == "sinusoidal":
            continue  # rebuilt from the formula at load, bit-identical (checked at export)
        if "alias:" + key in engine.meta:  # stored once under the tensor it aliases
            weight_bits[key.split(":", 1)[1]] = int(engine.meta[key]["bits"])
            continue
        if key.startswith(PACKED_PREFIXES):
            info = engine.meta.get(key) or engine.meta.get("w:" + key.split(":", 1)[1])
            if key.startswith("lng:"):
                info = engine.meta["lng_bits:" + key[4:]]
            bits, qmin = int(info["bits"]), int(info["qmin"])
            tensors[key] = pack_codes(t, bits, qmin)
            packed[key] = dict(bits=bits, qmin=qmin, qmax=int(info["qmax"]), shape=list(t.shape))
            weight_bits[key.split(":", 1)[1] if key.startswith("w:") else key] = bits
        else:
            tensors[key] = t.contiguous()
    for path, s in engine.scales.items():
        if path.endswith(".w_q.weight") and "alias:w:" + path[: -len(".w_q.weight")] in engine.meta:
            continue  # identical to the aliased weight's scales
        if isinstance(s, Tensor) and s.numel() > 1:
            tensors["scale:" + path] = s.float().contiguous()
    act = {k[2:]: v for k, v in engine.meta.items() if k.startswith("q:")}
    for path, v in act.items():
        v = dict(v)
        v["scale"] = engine.scales.get(path)
        act[path] = v
    requant = {}
    for key, t in engine.t.items():
        if key.startswith("rq:") and key.endswith(".m"):
            base = key[3:-2]
            m, sh = t, engine.t[key[:-2] + ".sh"]
            requant[base] = (dict(multiplier=int(m.reshape(-1)[0]), shift=int(sh.reshape(-1)[0])) if m.numel() == 1
                             else dict(multiplier="rq:" + base + ".m", shift="rq:" + base + ".sh", n=int(m.numel())))
    requant_grouped = {key[3:-2]: dict(ratios=key, bias=key[:-2] + ".b",
                                       shift=int(engine.t["rqg:" + key[3:-2] + ".sh"]))
                       for key in engine.t if key.startswith("gq:") and key.endswith(".r")}
    requant_add = {key[4:]: dict(zip(("ma", "ta", "mb", "tb", "shift", "la", "lb"), (int(v) for v in t)))
                   for key, t in engine.t.items() if key.startswith("rqa:")}
    requant_layer_norm = {key[4:]: dict(zip(("mA", "SA", "shift", "Em", "Ee", "Eint"), (int(v) for v in t)),
                                        bias_high=key + ".bh", bias_low=key + ".bl")
                          for key, t in engine.t.items() if key.startswith("lnq:") and key.count(".in_q.") and
                          not key.endswith((".bh", ".bl"))}
    header = {
        "format": FORMAT, "version": VERSION,
        "recipe": _jsonable(recipe),
        "model": _jsonable(engine.cfg),
        "bits": {"weights": weight_bits, "activations": {p: v["bits"] for p, v in act.items()}},
        "layout": {
            "packing": "codes - qmin as an LSB-first bit stream, ceil(n*bits/8) bytes, row-major over 'shape'",
            "weights": "linear [out, in]; conv1d [out, in, k]; conv2d [out, in, kh, kw]; embedding [rows, dim]; "
                       "symmetric, zero point 0, scale per output channel (scale:<module>.w_q.weight), or per "
                       "output channel and group of meta['w:<module>']['group_size'] input features ([out, groups]) "
                       "with integer ratios gk:<module> = round(s_g / max_g s_g * 2^group_frac_bits) (meta)",
            "biases": "int32 on the accumulator grid s_in * s_w[c] (per-group weights: s_in * max_g s_g[c]; "
                      "LayerNorm: s_gain * 2^-16)",
            "grouped_gemm": "acc = ((sum_g int32 GEMM_g * gk[:, g]) + 2^(f-1)) >> f, f = group_frac_bits - 8, plus "
                            "bias: on s_in * max_g s_g * 2^-8 (where no consumer folds, e.g. the logits)",
            "grouped_requant": "a grouped Linear feeding quantizer <q>: v = sum_g int32 GEMM_g * gq:<q>.r[:, g] + "
                               "gq:<q>.b (int64; r = round(s_in s_g / s_q * 2^S)), then requant with rqg:<q> "
                               "(multiplier 1, shift S)",
            "activations": "per tensor, value = scale * (q - zp), q in [qmin, qmax]",
            "requant": "q = clamp(round(acc * multiplier / 2^shift) + zp, qmin, qmax), rounding half up: for a "
                       "multiplier below 2^31 (one word) ((acc * multiplier + 2^(shift-1)) >> shift); from 2^31 (two "
                       "words, version 5: m = m_hi 2^31 + m_lo, 62 bits of the exact ratio of the scales) "
                       "(acc m_hi + floor(acc m_lo / 2^31) + 2^(s-1)) >> s with s = shift - 31, exact in int64 for "
                       "int32 accumulators",
            "requant_add": "residual adds of 16-bit codes, per consumer (rqa:<consumer> = [ma, ta, mb, tb, shift] or, "
                           "version 5, [ma, ta, mb, tb, shift, la, lb]): q = clamp(((x ma 2^ta + y mb 2^tb + "
                           "floor((x la 2^ta + y lb 2^tb) / 2^31) + 2^(shift-1)) >> shift) + zp, qmin, qmax), x = a - "
                           "za, y = b - zb (la = lb = 0 where absent); version 1 files: the sum (a - za) ka + (b - zb) "
                           "kb (meta add:<add>) requantized",
            "layer_norm": "c = n x - sum x, D = max(isqrt(floor(sum c^2 2^2k / n) + eps_term), 1), xhat = floor((c "
                          "2^(frac+1+k) + D) / 2D), out = xhat * gain + (bias << (frac - 16)) on s_gain * 2^-frac "
                          "(meta ln:<module> = {k, eps_term, frac}; frac 16 where absent, files before version 3)",
            "layer_norm_exact": "version 5: a LayerNorm straight onto each consumer's grid (lnq:<consumer> = [mA, "
                                "SA, shift S, Em, Ee, Eint], lnq:<consumer>.bh/.bl the bias words): c = n x - sum x, "
                                "V = sum c^2, per row Wf = floor((V / n) 2^2G) + floor(Em 2^(2G-Ee)) with G = (110 - "
                                "bitlen(V // n + Eint)) // 2, D = isqrt(Wf), M = min(round(mA 2^(S+30-SA+G) / D), "
                                "2^60 - 1) (0 where V = 0), u = c gain, t = u (M >> 30) + bh + floor((u (M mod 2^30) + "
                                "bl) / 2^30), q = clamp(((t + 2^(S-1)) >> S) + zp, qmin, qmax); A = s_gain / s_out = "
                                "mA 2^-SA, E = n^2 eps / s_x^2 = Em 2^-Ee",
            "stored_codes": "activations with qmin >= 0 and 8 bits are held in int8 as q - 128 at run time",
        },
        "activations": act,
        "requant": requant,
        "requant_add": requant_add,
        "requant_grouped": requant_grouped,
        "requant_layer_norm": requant_layer_norm,
        "packed": packed,
        "meta": _jsonable({k: v for k, v in engine.meta.items() if not k.startswith("q:")}),  # q: in activations
        "scales": {p: s for p, s in engine.scales.items() if not isinstance(s, Tensor) or s.numel() == 1},
    }
    header["scales"] = {p: float(s) for p, s in header["scales"].items() if p not in act}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    from safetensors.torch import save_file
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(out)), prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"qasr": json.dumps(header, separators=(",", ":"))})
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return header


def read_header(path: str) -> Dict[str, Any]:
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if "qasr" not in meta:
        raise ValueError(f"{path}: not a {FORMAT} file (no 'qasr' header)")
    header = json.loads(meta["qasr"])
    if header.get("format") != FORMAT or header.get("version") not in READABLE_VERSIONS:
        raise ValueError(f"{path}: unsupported format {header.get('format')!r} version {header.get('version')!r}")
    return header


def load_engine(path: str) -> IntegerEngine:
    """The integer engine of an exported file (weights unpacked to int8 codes)."""
    from safetensors.torch import load_file
    header = read_header(path)
    raw = load_file(path)
    tensors: Dict[str, Tensor] = {}
    for key, t in raw.items():
        if key.startswith("scale:"):
            continue
        info = header["packed"].get(key)
        if info is not None:
            tensors[key] = unpack_codes(t, info["bits"], info["qmin"], info["shape"])
        else:
            tensors[key] = t
    for path, v in header["activations"].items():
        header["meta"]["q:" + path] = {k: v[k] for k in ("zp", "qmin", "qmax", "bits", "signed")}
    for key, target in list(header["meta"].items()):
        if key.startswith("alias:"):
            tensors[key[len("alias:"):]] = tensors[target]
    eng = IntegerEngine(header["model"], tensors, header["meta"])
    eng.scales = dict(header.get("scales", {}))
    eng.scales.update({p: v["scale"] for p, v in header["activations"].items()})
    return eng


def size_report(path: str) -> Dict[str, float]:
    """Bytes on disk by category, and the bound ``sum(params * bits / 8) + int32 biases + scales/requant``."""
    from safetensors import safe_open
    header = read_header(path)
    cats = {"weights_packed": 0, "biases_int32": 0, "scales_requant": 0, "tables": 0}
    ideal_weights = 0.0
    with safe_open(path, framework="pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            nbytes = t.numel() * t.element_size()
            if key in header["packed"]:
                info = header["packed"][key]
                n = 1
                for s in info["shape"]:
                    n *= s
                ideal_weights += n * info["bits"] / 8
                cats["weights_packed"] += nbytes
            elif key.startswith("b:"):
                cats["biases_int32"] += nbytes
            elif key.startswith(("scale:", "rq:", "gk:", "gq:", "rqg:")):
                cats["scales_requant"] += nbytes
            else:
                cats["tables"] += nbytes
    total = os.path.getsize(path)
    header_bytes = total - sum(cats.values())
    bound = 1.05 * (ideal_weights + cats["biases_int32"]) + cats["scales_requant"] + cats["tables"] + header_bytes
    return dict(total=total, ideal_weights=ideal_weights, bound=bound, header=header_bytes, **cats)
