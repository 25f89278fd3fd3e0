"""Decoder inputs for audio-only utterances: the (teacher) model's own greedy transcripts."""
from typing import Any, Dict, List, Tuple

import torch
from torch import Tensor

from .distill_losses import greedy_transcripts


def pad_right(seqs: List[Tensor], pad: int, shift_eos_to_front: int = -1) -> Tensor:
    """Right-padded batch; with ``shift_eos_to_front=eos`` each row becomes ``[eos] + seq[:-1]`` (decoder input)."""
    width = max(len(s) for s in seqs)
    out = seqs[0].new_full((len(seqs), width), pad)
    for i, s in enumerate(seqs):
        if shift_eos_to_front >= 0:
            s = torch.cat([s.new_tensor([shift_eos_to_front]), s[:-1]])
        out[i, : len(s)] = s
    return out


def with_model_transcripts(model, sample: Dict[str, Any], dictionary, max_len: int) -> Tuple[Tensor, Tensor]:
    """``(target, prev_output_tokens)`` of ``sample`` where rows with ``labeled=False`` take ``model``'s greedy
    transcript instead of their empty reference."""
    target, prev = sample["target"], sample["net_input"]["prev_output_tokens"]
    labeled = sample.get("labeled")
    if labeled is None or bool(labeled.all()):
        return target, prev
    pad, eos = dictionary.pad(), dictionary.eos()
    rows = (~labeled).nonzero().squeeze(1)
    net = sample["net_input"]
    hyps = greedy_transcripts(model, net["src_tokens"][rows], net["src_lengths"][rows], bos=eos, eos=eos, pad=pad,
                              max_len=max_len)
    seqs = [t[t.ne(pad)] for t in target]
    for k, i in enumerate(rows.tolist()):
        seqs[i] = hyps[k][hyps[k].ne(pad)]
    return pad_right(seqs, pad), pad_right(seqs, pad, shift_eos_to_front=eos)
