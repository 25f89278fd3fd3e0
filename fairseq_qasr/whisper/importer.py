"""Write a fairseq model + data directory for an OpenAI Whisper checkpoint (imports fairseq).

``import_whisper(checkpoint, out)`` writes into ``out``:

- ``checkpoint.pt``  fairseq checkpoint of ``qtransformer_conv`` with Whisper's layout (see ``convert``),
- ``dict.txt``       fairseq dictionary, symbols = Whisper ids (see ``tokenizer.WhisperVocab``),
- ``config.yaml``    data config: ``features: {type: whisper}``, ``bpe_tokenizer: {bpe: whisper}``,
- ``<split>.tsv``    (optional) copies of prepared manifests with absolute audio paths, so ``out`` is a
  complete data directory for ``fairseq-generate out --path out/checkpoint.pt``.
"""
from __future__ import annotations

import glob
import os
from typing import Dict, Optional, Sequence

import torch
import yaml

from .convert import convert_state_dict, load_whisper_checkpoint, model_options, tokenizer_for
from .fetch import sha256_file
from .tokenizer import WhisperVocab



def _register() -> None:
    import fairseq  # noqa: F401  (fairseq_qasr registers itself only once fairseq is loaded)

    import fairseq_qasr

    fairseq_qasr.register()
    from . import register  # noqa: F401  (--bpe whisper, --scoring whisper_wer)


def data_config(dims: Dict[str, int], multilingual: bool, extra: Optional[dict] = None,
                window: str = "transcribe") -> dict:
    bpe = {"bpe": "whisper"}
    if multilingual:
        bpe.update(whisper_multilingual=True, whisper_num_languages=dims["n_vocab"] - 51765 - 1)
    cfg = {
        "sample_rate": 16000,
        "features": {"type": "whisper", "window": window, "num_mel_bins": dims["n_mels"]},
        "bpe_tokenizer": bpe,
        "vocab_filename": "dict.txt",
    }
    if extra:
        cfg.update(extra)
    return cfg


def copy_manifests(src: str, out: str) -> Sequence[str]:
    """Copy ``src/*.tsv`` (or one .tsv file) into ``out`` with absolute audio paths."""
    from fairseq_qasr.data.manifest import read_manifest, write_manifest

    paths = [src] if src.endswith(".tsv") else sorted(glob.glob(os.path.join(src, "*.tsv")))
    names = []
    for p in paths:
        write_manifest(os.path.join(out, os.path.basename(p)), read_manifest(p))
        names.append(os.path.basename(p)[:-4])
    return names


def build_cfg(out: str, options: Dict):
    """Full fairseq config (as fairseq-train would build it) for task librispeech_asr + these model options."""
    from fairseq import options as fo
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    import fairseq_qasr

    plugin_dir = list(fairseq_qasr.__path__)[0]  # the path fairseq's import_user_module accepts
    parser = fo.get_training_parser()
    args = fo.parse_args_and_arch(parser, [out, "--user-dir", plugin_dir, "--task", "librispeech_asr",
                                           "--arch", "qtransformer_conv", "--criterion", "cross_entropy"])
    for k, v in options.items():
        setattr(args, k, v)
    return convert_namespace_to_omegaconf(args)


def import_whisper(checkpoint: str, out: str, manifests: Optional[str] = None, verify_load: bool = True,
                   language: Optional[str] = None, window: str = "transcribe", log=print) -> str:
    from fairseq import checkpoint_utils, tasks
    from omegaconf import OmegaConf

    _register()

    os.makedirs(out, exist_ok=True)
    out = os.path.abspath(out)
    dims, sd = load_whisper_checkpoint(checkpoint)  # OpenAI .pt or CTranslate2 model.bin
    tok = tokenizer_for(dims, language)
    vocab = WhisperVocab.from_tokenizer(tok)
    multilingual = dims["n_vocab"] >= 51865
    vocab.write_dict(os.path.join(out, "dict.txt"))
    info = {"whisper": {"checkpoint": os.path.basename(checkpoint), "sha256": sha256_file(checkpoint),
                        "dims": dims, "dictionary": "fairseq index 0=<|startoftranscript|>, 2=<|endoftext|>, "
                                                    "1/3=<pad>/<unk> (suppressed), others: symbol = Whisper id"}}
    with open(os.path.join(out, "config.yaml"), "w", encoding="utf-8") as f:
        yaml.safe_dump(data_config(dims, multilingual, info, window), f, sort_keys=False)
    if manifests:
        names = copy_manifests(manifests, out)
        log(f"manifests: {', '.join(names)}")

    opts = model_options(dims, tok, vocab)
    cfg = build_cfg(out, opts)
    task = tasks.setup_task(cfg.task)
    if len(task.target_dictionary) != len(vocab):
        raise RuntimeError(f"dictionary has {len(task.target_dictionary)} entries, expected {len(vocab)}")
    model = task.build_model(cfg.model)
    model.load_state_dict(convert_state_dict(sd, dims, vocab), strict=True)
    state = {
        "cfg": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        "args": None,
        "model": model.state_dict(),
        "criterion": None,
        "optimizer_history": [{"criterion_name": "CrossEntropyCriterion", "optimizer_name": "none",
                               "lr_scheduler_state": {"best": None}, "num_updates": 0}],
        "task_state": {},
        "extra_state": {"whisper_import": info["whisper"]},
        "last_optimizer_state": None,
    }
    path = os.path.join(out, "checkpoint.pt")
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
    log(f"wrote {path} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters), "
        f"{os.path.join(out, 'dict.txt')} ({len(vocab)} entries), {os.path.join(out, 'config.yaml')}")
    if verify_load:
        models, _cfg, _task = checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides={"data": out})
        loaded = models[0].state_dict()
        for k, v in model.state_dict().items():
            if not torch.equal(loaded[k], v):
                raise RuntimeError(f"reloaded checkpoint differs at {k}")
        log("reloaded with fairseq.checkpoint_utils: identical")
    return path
