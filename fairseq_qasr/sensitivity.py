"""Which quantized ops hurt: teacher-forced agreement of a quantized model with its full-precision original.

For each group of quantizers (op type x role x encoder/decoder, or one module), only that group is switched
on and the decoder's next-token distributions are compared with the float model's on the float model's own
transcripts: top-1 agreement (a flip in free-running greedy decoding derails the rest of the hypothesis) and
KL(float || quantized) per token. Cheap (one teacher-forced forward per group), so it ranks a recipe's
exceptions before any slow decoding run.
"""
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from fairseq_qasr.models.quantized import forward_and_normalize
from fairseq_qasr.quant import QModule, Quantizer


@dataclass
class Agreement:
    group: str
    quantizers: int
    top1: float  # share of target positions whose argmax equals the float model's
    kl: float  # mean KL(float || quantized) per target position, nats
    tokens: int


def quantizer_groups(model: nn.Module, by: str = "op", split_module: Sequence[str] = ()) -> Dict[str, List[Quantizer]]:
    """``by="op"``: ``enc|dec:<op type>:<role>``; ``by="module"``: ``<module path>:<role>``. Groups named in
    ``split_module`` are broken into their modules."""
    groups: Dict[str, List[Quantizer]] = defaultdict(list)
    for name, m in model.named_modules():
        if not isinstance(m, QModule):
            continue
        for qname, q in m.named_modules():
            if not isinstance(q, Quantizer):
                continue
            role = qname.split(".")[0]
            key = f"{'dec' if name.startswith('decoder') else 'enc'}:{m.op_type}:{role}"
            if by == "module" or key in split_module:
                key = f"{name}:{role}"
            groups[key].append(q)
    return dict(groups)


@torch.no_grad()
def teacher_forced_agreement(model: nn.Module, batches: Sequence[Mapping[str, Any]], reference: Sequence[torch.Tensor],
                             pad: int) -> tuple:
    """(top-1 agreement, mean KL, tokens) of ``model`` against float log-probs ``reference``."""
    agree = n = 0
    kl = 0.0
    for b, ref in zip(batches, reference):
        out = forward_and_normalize(model, b["net_input"]).float()
        mask = b["target"].ne(pad)
        agree += int((out.argmax(-1) == ref.argmax(-1))[mask].sum())
        n += int(mask.sum())
        kl += float((ref.exp() * (ref - out.clamp(min=-1e4))).sum(-1)[mask].sum())
    return agree / max(n, 1), kl / max(n, 1), n


@torch.no_grad()
def sensitivity(qmodel: nn.Module, float_model: nn.Module, batches: Sequence[Mapping[str, Any]], pad: int,
                by: str = "op", split_module: Sequence[str] = (), only: Optional[str] = None,
                progress=lambda it: it) -> List[Agreement]:
    """Agreement with everything quantized, then with each group alone; ``only`` filters groups (regex)."""
    reference = [forward_and_normalize(float_model, b["net_input"]).float() for b in batches]
    groups = quantizer_groups(qmodel, by, split_module)
    saved = {id(q): q.enabled for qs in groups.values() for q in qs}
    results = [Agreement("all", len(saved), *teacher_forced_agreement(qmodel, batches, reference, pad))]
    names = [g for g in sorted(groups) if only is None or re.search(only, g)]
    try:
        for g in progress(names):
            for k, qs in groups.items():
                for q in qs:
                    q.enabled = saved[id(q)] and k == g
            results.append(Agreement(g, len(groups[g]), *teacher_forced_agreement(qmodel, batches, reference, pad)))
    finally:
        for qs in groups.values():
            for q in qs:
                q.enabled = saved[id(q)]
    return results


def table(results: Sequence[Agreement]) -> str:
    lines = [f"{'quantizers on':<56} {'n':>4} {'top-1 agree':>11} {'KL nats':>9}", "-" * 84]
    for r in results:
        lines.append(f"{r.group:<56} {r.quantizers:>4} {r.top1:>11.4f} {r.kl:>9.4f}")
    lines.append(f"({results[0].tokens} target tokens; groups sorted by name; lower agreement = more sensitive)")
    return "\n".join(lines)
