#!/usr/bin/env python
"""Benchmark (not a test): one training step (forward, label-smoothed CE, backward, Adam) of a quantized model
(fake quantization, straight-through estimator) against the same model in full precision, same batch.

  python scripts/bench_qat_step.py --arch qtransformer_conv_s --quant-config w4a8 --batch 8 --frames 1000
  python scripts/bench_qat_step.py --path checkpoints/tiny.en/checkpoint.pt --quant-config w8a8

Prints the median step time of each and their ratio (goal: QAT <= 1.5x full precision).
"""
import argparse
import copy
import statistics
import sys
import time

import torch

import fairseq_qasr.checkpoints  # noqa: F401  (registers the plugin)
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss
from fairseq.data import Dictionary

from fairseq_qasr.models.qtransformer_conv import PRESETS, QTransformerConvModel, apply_preset
from fairseq_qasr.models.quantized import forward_and_normalize
from fairseq_qasr.quant import calibrate


class _Task:
    def __init__(self, vocab: int):
        self.target_dictionary = Dictionary()
        for i in range(vocab - 4):
            self.target_dictionary.add_symbol(f"tok{i}")


def build(args, quant: bool):
    if args.path:
        model, task, cfg = fairseq_qasr.checkpoints.load_model(args.path)
        if not quant:
            return model, task.target_dictionary
        mcfg = copy.deepcopy(cfg.model)
        from omegaconf import open_dict

        with open_dict(mcfg):
            mcfg.quant_config, mcfg.quant_recipe = args.quant_config, None
        qmodel = task.build_model(mcfg)
        qmodel.load_state_dict(model.state_dict())
        return qmodel, task.target_dictionary
    cfg = argparse.Namespace(quant_config=args.quant_config if quant else None)
    apply_preset(cfg, PRESETS[args.arch])
    torch.manual_seed(0)
    task = _Task(args.vocab)
    return QTransformerConvModel.build_model(cfg, task), task.target_dictionary


def batch(args, model, dictionary):
    g = torch.Generator().manual_seed(0)
    frames = args.frames
    feats = torch.randn(args.batch, frames, model.encoder_input_dim, generator=g)
    tokens = torch.randint(4, len(dictionary), (args.batch, args.tokens), generator=g)
    prev = torch.cat([torch.full((args.batch, 1), dictionary.eos()), tokens[:, :-1]], dim=1)
    return {"src_tokens": feats, "src_lengths": torch.full((args.batch,), frames), "prev_output_tokens": prev}, tokens


def stepper(model, net_input, target, pad: int):
    """One training step of ``model`` (forward, loss, backward, Adam); returns its wall time."""
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> float:
        start = time.perf_counter()
        lprobs = forward_and_normalize(model, net_input)
        loss, _ = label_smoothed_nll_loss(lprobs.view(-1, lprobs.size(-1)), target.view(-1), 0.1, ignore_index=pad)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return time.perf_counter() - start

    return step


def time_alternating(fp_step, q_step, steps: int):
    """Alternate the two steps so that any background load hits both alike; the first pair warms up."""
    fp_step(), q_step()
    fp, q = [], []
    for _ in range(steps):
        fp.append(fp_step())
        q.append(q_step())
    return statistics.median(fp), statistics.median(q)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path", help="a full-precision checkpoint (else --arch with random weights)")
    p.add_argument("--arch", default="qtransformer_conv_s", choices=sorted(PRESETS))
    p.add_argument("--quant-config", default="w4a8")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--frames", type=int, default=800, help="input frames per utterance")
    p.add_argument("--tokens", type=int, default=40, help="target tokens per utterance")
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    fp, dictionary = build(args, quant=False)
    qat, _ = build(args, quant=True)
    qat.load_state_dict(fp.state_dict())
    net_input, target = batch(args, fp, dictionary)
    calibrate(qat, [lambda m: forward_and_normalize(m, net_input)])
    t_fp, t_q = time_alternating(stepper(fp, net_input, target, dictionary.pad()),
                                 stepper(qat, net_input, target, dictionary.pad()), args.steps)
    params = sum(p.numel() for p in fp.parameters())
    what = args.path or f"{args.arch} (random weights)"
    print(f"model: {what}, {params / 1e6:.1f} M parameters; batch {args.batch} x {args.frames} frames, "
          f"{args.tokens} target tokens; {args.threads} threads; median of {args.steps} alternating steps")
    print(f"full-precision step : {t_fp * 1000:8.1f} ms")
    print(f"QAT step ({args.quant_config:>5})   : {t_q * 1000:8.1f} ms")
    print(f"ratio QAT / FP      : {t_q / t_fp:8.2f}x   (goal <= 1.5x)")


if __name__ == "__main__":
    sys.exit(main())
