"""Post-training quantization of a full-precision checkpoint: build the quantized model from a recipe, fit the
observers on audio (transcripts not needed), optionally correct biases, write a quantized checkpoint."""
import contextlib
import copy
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from fairseq_qasr.checkpoints import derived_checkpoint, load_model, read_state, write_checkpoint
from fairseq_qasr.criterions.teacher_targets import with_model_transcripts
from fairseq_qasr.models.quantized import forward_and_normalize, is_quantized, latent_float_state
from fairseq_qasr.quant import calibrate, load_recipe, set_quantization, uncalibrated
from fairseq_qasr.quant.modules import QConv1d, QConv2d, QLinear

logger = logging.getLogger(__name__)


@dataclass
class PTQResult:
    out: str
    recipe: str
    utterances: int
    seconds: float
    bias_corrected: List[str] = field(default_factory=list)


def recipe_with_observer(recipe: Any, observer: Optional[str]) -> Dict[str, Any]:
    """The recipe as a dict, with every activation (input/output) quantizer's observer set to ``observer``."""
    d = load_recipe(recipe).to_dict()
    if observer is None:
        return d
    for role in ("input", "output"):
        if d["defaults"].get(role):
            d["defaults"][role]["observer"] = observer
    for section in (d.get("ops") or {}), (d.get("overrides") or {}):
        for spec in section.values():
            for role in ("input", "output"):
                if isinstance(spec.get(role), dict):
                    spec[role]["observer"] = observer
    d["name"] = f"{d['name']}+{observer}"
    return d


def calibration_batches(task, split: str, num_utts: int, max_tokens: int, seed: int) -> List[Dict[str, Any]]:
    """``num_utts`` utterances of ``split`` (labeled or not), drawn with a fixed seed, batched by frames."""
    task.cfg.unlabeled = "keep"
    task.load_dataset(split)
    ds = task.dataset(split)
    rng = np.random.RandomState(seed)
    chosen = rng.permutation(len(ds))[: min(num_utts, len(ds))]
    chosen = chosen[np.argsort(-ds.src_sizes[chosen], kind="mergesort")]
    batches = ds.batch_by_size(chosen, max_tokens=max_tokens, max_sentences=None, required_batch_size_multiple=1)
    return [ds.collater([ds[int(i)] for i in b]) for b in batches]


def decoder_inputs(float_model, batches, dictionary, max_len: int) -> None:
    """Audio-only rows are teacher-forced on the float model's own greedy transcript."""
    for b in batches:
        target, prev = with_model_transcripts(float_model, b, dictionary, max_len)
        b["target"], b["net_input"]["prev_output_tokens"] = target, prev


@torch.no_grad()
def correct_biases(model: nn.Module, batches: List[Dict[str, Any]]) -> List[str]:
    """Empirical bias correction (Nagel et al. 2019): subtract the expected output error of the quantized
    weights, ``(W_q - W) E[x]``, from each biased Linear/Conv, with ``E[x]`` measured on the quantized model."""
    sums: Dict[str, torch.Tensor] = {}
    counts: Dict[str, int] = {}
    hooks = []
    targets = {n: m for n, m in model.named_modules() if isinstance(m, (QLinear, QConv1d, QConv2d))
               and getattr(m, "bias", None) is not None}

    def hook(name):
        def fn(module, args):
            x = args[0].detach().float()
            dims = [d for d in range(x.dim()) if d != (x.dim() - 1 if isinstance(module, QLinear) else 1)]
            sums[name] = sums.get(name, 0) + x.sum(dim=dims)
            counts[name] = counts.get(name, 0) + x.numel() // x.shape[-1 if isinstance(module, QLinear) else 1]
        return fn

    for name, m in targets.items():
        hooks.append(m.register_forward_pre_hook(hook(name)))
    try:
        for b in batches:
            forward_and_normalize(model, b["net_input"])
    finally:
        for h in hooks:
            h.remove()
    done = []
    for name, m in targets.items():
        if name not in sums:
            continue
        mean_x = sums[name] / counts[name]
        w = m.weight
        err = m.w_q["weight"](w) - w
        err = err.sum(dim=tuple(range(2, err.dim()))) if err.dim() > 2 else err  # conv: sum over the kernel
        m.bias.sub_(err @ mean_x)
        done.append(name)
    return done


def quantize_checkpoint(path: str, recipe: Any, data: str, split: str, out: str, num_utts: int = 64,
                        observer: Optional[str] = None, bias_correction: bool = False, max_tokens: int = 30000,
                        seed: int = 1, max_len: int = 200, requantize: bool = False) -> PTQResult:
    """PTQ: ``path`` (full precision) -> calibrated quantized checkpoint ``out``. ``requantize``: ``path`` may be
    a quantized (e.g. QAT) checkpoint, whose latent float weights are quantized anew with ``recipe`` (progressive
    bit lowering across training phases: QAT at 4 bits, then 2-bit PTQ + QAT from those weights)."""
    started = time.time()
    float_model, task, cfg = load_model(path, data=data)
    if is_quantized(float_model):
        if not requantize:
            raise ValueError(f"{path} is already quantized (recipe {float_model.qasr_recipe.name!r}); give a "
                             "full-precision checkpoint, or requantize its latent float weights (--requantize)")
        set_quantization(float_model, False)  # the latent float model decodes the calibration transcripts
    recipe_dict = recipe_with_observer(recipe, observer)
    model_cfg = copy.deepcopy(cfg.model)
    from omegaconf import OmegaConf, open_dict

    with open_dict(model_cfg) if OmegaConf.is_config(model_cfg) else contextlib.nullcontext():
        model_cfg.quant_config = None
        model_cfg.quant_recipe = json.dumps(recipe_dict, sort_keys=True)
    qmodel = task.build_model(model_cfg)
    qmodel.load_state_dict(latent_float_state(float_model) if is_quantized(float_model) else float_model.state_dict())
    qmodel.eval()
    batches = calibration_batches(task, split, num_utts, max_tokens, seed)
    decoder_inputs(float_model, batches, task.target_dictionary, max_len)
    n_utts = sum(b["nsentences"] for b in batches)
    steps = [lambda m, b=b: forward_and_normalize(m, b["net_input"]) for b in batches]
    calibrate(qmodel, tqdm(steps, desc="calibrating", unit="batch", leave=False))
    missing = uncalibrated(qmodel)
    if missing:
        raise RuntimeError(f"calibration data never reached {len(missing)} quantized ops, e.g. {missing[:3]}")
    corrected = correct_biases(qmodel, batches) if bias_correction else []
    set_quantization(qmodel, True)
    state = derived_checkpoint(read_state(path), qmodel, {"quant_config": None, "quant_recipe": model_cfg.quant_recipe})
    write_checkpoint(state, out)
    return PTQResult(out=out, recipe=recipe_dict["name"], utterances=n_utts, seconds=time.time() - started,
                     bias_corrected=corrected)
