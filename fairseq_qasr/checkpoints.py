"""Load and write fairseq checkpoints of the plugin's models (float or quantized), safely and atomically."""
import contextlib
import copy
import os
import tempfile
from typing import Any, Dict, Optional, Tuple

import torch

import fairseq  # noqa: F401  (registration below needs fairseq loaded)
import fairseq_qasr
from fairseq import checkpoint_utils

fairseq_qasr.register()


def load_model(path: str, data: Optional[str] = None, overrides: Optional[Dict[str, Any]] = None):
    """Rebuild exactly the model of a checkpoint (quantized ones included: the recipe and every quantizer's
    state are in it). ``data`` overrides the task's data directory. Returns ``(model, task, cfg)``, eval mode."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    arg_overrides = dict(overrides or {})
    if data is not None:
        arg_overrides["data"] = data
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides=arg_overrides)
    model = models[0].eval()
    return model, task, cfg


def read_state(path: str) -> Dict[str, Any]:
    """The checkpoint dict (``weights_only`` loading, fairseq's upgrades applied)."""
    return checkpoint_utils.load_checkpoint_to_cpu(path)


def write_checkpoint(state: Dict[str, Any], path: str) -> None:
    """Write atomically: a crash mid-write never leaves a truncated checkpoint at ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".pt")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def derived_checkpoint(base: Dict[str, Any], model, model_cfg_updates: Dict[str, Any]) -> Dict[str, Any]:
    """A checkpoint for ``model`` built from ``base`` (a loaded checkpoint): same task and training config,
    the model config updated, no optimizer state (it belongs to another model)."""
    from omegaconf import OmegaConf, open_dict

    state = {k: v for k, v in base.items() if k not in ("last_optimizer_state", "model")}
    cfg = copy.deepcopy(base["cfg"])
    with open_dict(cfg) if OmegaConf.is_config(cfg) else contextlib.nullcontext():
        for key, value in model_cfg_updates.items():
            if isinstance(cfg["model"], dict):
                cfg["model"][key] = value
            else:
                setattr(cfg["model"], key, value)
    state["cfg"] = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg
    state["model"] = model.state_dict()
    state["optimizer_history"] = [{"criterion_name": "none", "optimizer_name": "none",
                                   "lr_scheduler_state": {"best": None}, "num_updates": 0}]
    state["extra_state"] = {"train_iterator": {"epoch": 1}, "val_loss": None}
    return state
