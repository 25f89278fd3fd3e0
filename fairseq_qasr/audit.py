"""Honesty audit CLI: ``python -m fairseq_qasr.audit --path CKPT --data MANIFEST``.

Loads a fairseq checkpoint (a quantized one written with :func:`fairseq_qasr.quant.quant_checkpoint_state`,
or a float one that is then quantized with ``--recipe`` and calibrated on the first ``--calib``
utterances), runs real utterances of the manifest through it under the aten-level auditor, prints the
per-op table and a verdict. Exit status: 0 pass, 1 violations (each names op and module path), 2 a
model the quantizer refuses (strict) or bad input.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, List, Optional, Sequence

import torch

from fairseq_qasr.quant import (RecipeError, UnsupportedOpError, audit, calibrate, materialize_wrappers,
                                quantize_model)

QUANT_KEY = "qasr_quant"  # checkpoint entry holding {"recipe": <recipe dict>}


def utterance_batches(task: Any, rows: Sequence[Any], limit: int) -> List[dict]:
    """One fairseq ``net_input`` per manifest row: features, lengths, teacher-forced target tokens."""
    from fairseq_qasr.data.audio import read_audio

    d = task.target_dictionary
    out = []
    for row in list(rows)[:limit]:
        wav = read_audio(row.audio, sample_rate=task.sample_rate, where=f"line {row.line}")
        feats = task.feature_fn(wav)
        ids = [d.eos()]
        if row.tgt_text:
            line = task._tokenize(row.tgt_text) if hasattr(task, "_tokenize") else row.tgt_text
            ids += d.encode_line(line, add_if_not_exist=False, append_eos=False).tolist()
        out.append({"src_tokens": feats.unsqueeze(0), "src_lengths": torch.tensor([feats.shape[0]]),
                    "prev_output_tokens": torch.tensor([ids])})
    return out


def decoding_steps(batches: List[dict]) -> List[Any]:
    """Run each batch as decoding does: forward, then the model's output log-softmax."""
    def step(model: torch.nn.Module, b: dict) -> Any:
        out = model(**b)
        return model.get_normalized_probs(out, log_probs=True) if hasattr(model, "get_normalized_probs") else out

    return [lambda m, b=b: step(m, b) for b in batches]


def search_steps(batches: List[dict], max_steps: int = 8) -> List[Any]:
    """Run each batch the way fairseq's search (``fairseq-generate``) calls the model: ``encoder.forward_torchscript``,
    then ``decoder.forward`` one token at a time with the incremental state (the reference tokens, at most
    ``max_steps``), then ``get_normalized_probs``. Those calls bypass ``module(...)``; the auditor sees whether the
    model's own ops still run quantized."""
    def steps(model: torch.nn.Module, b: dict) -> None:
        enc = model.encoder.forward_torchscript(b)
        state: dict = {}
        prev = b["prev_output_tokens"]
        for t in range(min(prev.shape[1], max_steps)):
            out = model.decoder.forward(prev[:, : t + 1], encoder_out=enc, incremental_state=state)
            model.get_normalized_probs((out[0][:, -1:], out[1]), log_probs=True)

    return [lambda m, b=b: steps(m, b) for b in batches]


def unfuse_fairseq_attention(model: torch.nn.Module) -> int:
    """fairseq's MultiheadAttention calls the fused F.multi_head_attention_forward (raw weights, not
    auditable) unless its embed-dim check is skipped; skipping it selects the unfused path only."""
    n = 0
    for m in model.modules():
        if hasattr(m, "_set_skip_embed_dim_check"):
            m._set_skip_embed_dim_check()
            n += 1
    return n


def prepare_model(model: torch.nn.Module, state: dict, recipe: str, calib: List[dict]) -> torch.nn.Module:
    """Quantize ``model`` from a checkpoint ``state`` (quantized, or float + recipe + calibration)."""
    unfuse_fairseq_attention(model)
    model.eval()
    if getattr(model, "qasr_recipe", None) is not None:  # quantized when built, from the checkpoint's own recipe
        model.load_state_dict(state["model"])
        return model
    quant = state.get(QUANT_KEY)
    if quant is not None:
        quantize_model(model, quant["recipe"], methods=quant.get("methods", ()))
        materialize_wrappers(model, state["model"])
        model.load_state_dict(state["model"])
        return model
    model.load_state_dict(state["model"])
    if not calib:
        raise ValueError("a float checkpoint needs --calib > 0 utterances to calibrate")
    quantize_model(model, recipe, example_inputs=calib[0])
    calibrate(model, calib)
    return model


def disable_quantizers(model: torch.nn.Module, pattern: str) -> int:
    """Switch off every quantizer inside modules whose path matches ``pattern``; returns how many modules."""
    import re

    from fairseq_qasr.quant import QModule

    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"--float: bad regular expression {pattern!r}: {e}") from e
    hit = [m for name, m in model.named_modules() if isinstance(m, QModule) and rx.search(name)]
    if not hit:
        raise ValueError(f"--float: no quantized module path matches {pattern!r}")
    for m in hit:
        for q in m.quantizers():
            q.enabled = False
    return len(hit)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fairseq_qasr.audit", description=__doc__.split("\n")[0])
    p.add_argument("--path", required=True, help="fairseq checkpoint (.pt)")
    p.add_argument("--data", required=True, help="manifest TSV of utterances to run")
    p.add_argument("--data-dir", help="prepared data directory for the task (default: the manifest's directory)")
    p.add_argument("--recipe", default="w8a8", help="recipe for a float checkpoint (name or YAML path)")
    p.add_argument("--calib", type=int, default=8, help="utterances used to calibrate a float checkpoint")
    p.add_argument("--max-utts", type=int, default=4, help="utterances run under the auditor")
    p.add_argument("--float", dest="float_pattern", metavar="REGEX",
                   help="switch off the quantizers of modules whose path matches REGEX (what-if: the verdict "
                        "then fails, naming every op left in float)")
    args = p.parse_args(argv)

    from fairseq import checkpoint_utils, tasks

    import fairseq_qasr
    from fairseq_qasr.checkpoint_safety import allow_fairseq_checkpoint_classes
    from fairseq_qasr.data.manifest import read_manifest

    try:
        fairseq_qasr.register()  # the plugin's tasks and models
        allow_fairseq_checkpoint_classes()
        state = checkpoint_utils.load_checkpoint_to_cpu(args.path)
        cfg = state["cfg"]
        cfg.task.data = args.data_dir or os.path.dirname(os.path.abspath(args.data))
        task = tasks.setup_task(cfg.task)
        model = task.build_model(cfg.model)
        rows = read_manifest(args.data)
        quantized = QUANT_KEY in state or getattr(model, "qasr_recipe", None) is not None
        calib = decoding_steps(utterance_batches(task, rows, args.calib)) if not quantized else []
        model = prepare_model(model, state, args.recipe, calib)
        if args.float_pattern:
            print(f"audit: quantizers off in {disable_quantizers(model, args.float_pattern)} modules "
                  f"matching {args.float_pattern!r}")
        utts = utterance_batches(task, rows, args.max_utts)
        batches = decoding_steps(utts) + (search_steps(utts) if hasattr(model, "decoder") else [])
        report = audit(model, batches)
    except (UnsupportedOpError, RecipeError, ValueError, OSError) as e:
        print(f"audit: error: {e}", file=sys.stderr)
        return 2
    print(report.table())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
