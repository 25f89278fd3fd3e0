"""Plain-torch distillation losses and greedy teacher transcripts."""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def kl_teacher_student(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, temperature: float) -> Tensor:
    """Sum over unmasked positions of ``T^2 * KL(p_teacher || p_student)`` at temperature ``T`` (Hinton et al. 2015)."""
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    p_t = log_p_t.exp()
    # tokens both models suppress (-inf logits) carry no teacher mass: 0 * (-inf - -inf) must count as 0
    kl = torch.where(p_t > 0, p_t * (log_p_t - log_p_s), torch.zeros_like(p_t)).sum(dim=-1)
    return (kl * mask).sum() * (t * t)


def hidden_mse(student: List[Tensor], teacher: List[Tensor], masks: List[Tensor]) -> Tensor:
    """Sum over positions of the mean squared difference of paired hidden states (``(B, T, C)`` each)."""
    total = student[0].new_zeros(())
    for s, t, m in zip(student, teacher, masks):
        total = total + (((s.float() - t.float()) ** 2).mean(dim=-1) * m).sum()
    return total


@torch.no_grad()
def greedy_transcripts(model, src_tokens: Tensor, src_lengths: Tensor, bos: int, eos: int, pad: int,
                       max_len: int, encoder_out: Optional[Dict[str, List[Tensor]]] = None) -> Tensor:
    """Greedy (beam 1) decoding of a fairseq encoder-decoder with incremental state: ``(B, <=max_len)`` token ids
    ending in EOS, right-padded with ``pad``. ``encoder_out``: the encoder's output on these rows, if already run."""
    if encoder_out is None:
        encoder_out = model.encoder(src_tokens, src_lengths)
    batch = src_tokens.size(0)
    tokens = torch.full((batch, 1), bos, dtype=torch.long, device=src_tokens.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=src_tokens.device)
    state: Dict[str, Dict[str, Optional[Tensor]]] = {}
    out: List[Tensor] = []
    for _ in range(max_len):
        logits, _ = model.decoder(tokens, encoder_out=encoder_out, incremental_state=state)
        logits[:, -1, pad] = float("-inf")
        step = logits[:, -1].argmax(dim=-1)
        if len(out) == max_len - 1:
            step = torch.full_like(step, eos)
        step = step.masked_fill(finished, pad)
        out.append(step)
        finished |= step.eq(eos)
        tokens = torch.cat([tokens, step.unsqueeze(1)], dim=1)
        if finished.all():
            break
    return torch.stack(out, dim=1)
