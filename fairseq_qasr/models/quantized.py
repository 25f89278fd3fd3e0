"""Build-time quantization of a fairseq speech model from a recipe (``--quant-config``).

The recipe actually used is stored in the model config (``quant_recipe``, JSON), so a checkpoint carries it
and ``fairseq-generate`` / the audit rebuild exactly the trained quantized model from the checkpoint alone.
"""
import json
import logging
from typing import Any, Dict, Mapping, Optional

import torch
from torch import nn

from fairseq_qasr.quant import freeze_wrappers, load_recipe, quantize_model
from fairseq_qasr.quant.modules import OP_CLASSES, QModule
from fairseq_qasr.quant.quantizer import Quantizer
from fairseq_qasr.quant.recipe import Recipe

logger = logging.getLogger(__name__)

EXAMPLE_FRAMES = 96  # long enough for every front-end's subsampling; Whisper-layout models get their window


def resolve_recipe(cfg: Any) -> Optional[Recipe]:
    """The recipe named by ``cfg.quant_recipe`` (JSON, from a checkpoint) or ``cfg.quant_config`` (name/path)."""
    stored = getattr(cfg, "quant_recipe", None)
    if stored:
        return load_recipe(json.loads(stored))
    name = getattr(cfg, "quant_config", None)
    return load_recipe(name) if name else None


def example_forward(model: nn.Module, frames: int) -> None:
    """One full-sequence forward and two incremental decoder steps: every call site gets its wrapper."""
    device = next(model.parameters()).device
    feats = torch.zeros(1, frames, model.encoder_input_dim, device=device)
    feats.normal_(generator=torch.Generator(device="cpu").manual_seed(0)) if device.type == "cpu" else feats.normal_()
    lengths = torch.tensor([frames], device=device)
    eos = model.decoder.dictionary.eos()
    prev = torch.tensor([[eos, 4, 5]], device=device) % len(model.decoder.dictionary)
    enc = model.encoder(feats, lengths)
    model.get_normalized_probs(model.decoder(prev, encoder_out=enc), log_probs=True)
    state: Dict[str, Dict[str, Optional[torch.Tensor]]] = {}
    for t in range(1, 3):
        model.decoder(prev[:, :t], encoder_out=enc, incremental_state=state)


def forward_and_normalize(model: nn.Module, net_input: Mapping[str, Any]) -> torch.Tensor:
    """What decoding runs: the model's forward, then its (quantized) output log-softmax. Calibration and the
    audit use this, so every quantizer that fairseq-generate reaches gets a range and is checked."""
    out = model(**net_input)
    return model.get_normalized_probs(out, log_probs=True)


def quantize_fairseq_model(model: nn.Module, cfg: Any) -> nn.Module:
    """Quantize ``model`` in place with the recipe of ``cfg`` (no-op without one); record the recipe in ``cfg``."""
    recipe = resolve_recipe(cfg)
    if recipe is None:
        return model
    was_training = model.training
    model.eval()
    frames = getattr(model, "example_frames", EXAMPLE_FRAMES)
    quantize_model(model, recipe, example_inputs=lambda m: example_forward(m, frames))
    freeze_wrappers(model)  # a call site unseen during discovery raises instead of silently appearing
    model.train(was_training)
    _set_cfg(cfg, "quant_recipe", json.dumps(recipe.to_dict(), sort_keys=True))
    n = sum(isinstance(m, Quantizer) for m in model.modules())
    logger.info(f"quantized with recipe {recipe.name!r}: {n} quantizers")
    return model


def _set_cfg(cfg: Any, key: str, value: Any) -> None:
    from omegaconf import OmegaConf, open_dict

    if OmegaConf.is_config(cfg):
        with open_dict(cfg):
            setattr(cfg, key, value)
    else:
        setattr(cfg, key, value)


def is_quantized(model: nn.Module) -> bool:
    return getattr(model, "qasr_recipe", None) is not None


def split_float_state(model: nn.Module, state_dict: Mapping[str, Any]) -> bool:
    """True when ``state_dict`` is a float checkpoint (no quantizer state) loaded into a quantized model."""
    quant_keys = {k for k, _ in model.state_dict().items() if _is_quant_key(model, k)}
    return bool(quant_keys) and not any(k in state_dict for k in quant_keys)


def latent_float_state(model: nn.Module) -> Dict[str, Any]:
    """The float (latent) weights of a quantized model: its state without any quantizer or wrapper state, which
    a float model of the same architecture (or one quantized with another recipe) loads."""
    return {k: v for k, v in model.state_dict().items() if not _is_quant_key(model, k)}


def _is_quant_key(model: nn.Module, key: str) -> bool:
    """State that only the quantized model has: inside a Quantizer, or inside a routed op wrapper
    (``<op>_<k>`` submodules created by the replacement tool, e.g. ``add_0.const_value``)."""
    module: nn.Module = model
    for part in key.split(".")[:-1]:
        child = module._modules.get(part)
        if child is None:
            return False
        op, _, k = part.rpartition("_")
        if isinstance(child, Quantizer) or (k.isdigit() and op in OP_CLASSES and isinstance(child, QModule)
                                            and not isinstance(module, QModule)):
            return True
        module = child
    return False
