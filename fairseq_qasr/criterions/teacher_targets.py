"""Decoder inputs for audio-only utterances: the (teacher) model's own greedy transcripts."""
from typing import Any, Dict, List, Optional, Tuple

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


class TranscriptCache:
    """Greedy transcripts of a frozen model, keyed by utterance id and a checksum of its input features, so an
    utterance seen again with the same features (later epochs; no augmentation) is not decoded again."""

    def __init__(self) -> None:
        self.store: Dict[Tuple[int, int, float], Tensor] = {}
        self.hits = self.misses = 0

    @staticmethod
    def keys(sample: Dict[str, Any], rows: List[int]) -> List[Tuple[int, int, float]]:
        net = sample["net_input"]
        ids = sample.get("id")
        if ids is None:
            return []
        sums = net["src_tokens"][rows].double().flatten(1).sum(1).tolist()
        return [(int(ids[r]), int(net["src_lengths"][r]), s) for r, s in zip(rows, sums)]


def with_model_transcripts(model, sample: Dict[str, Any], dictionary, max_len: int,
                           encoder_out: Optional[Dict[str, List[Tensor]]] = None,
                           cache: Optional[TranscriptCache] = None) -> Tuple[Tensor, Tensor]:
    """``(target, prev_output_tokens)`` of ``sample`` where rows with ``labeled=False`` take ``model``'s greedy
    transcript instead of their empty reference. ``encoder_out``: ``model``'s encoder output on the whole batch,
    if already computed; ``cache``: transcripts decoded before."""
    target, prev = sample["target"], sample["net_input"]["prev_output_tokens"]
    labeled = sample.get("labeled")
    if labeled is None or bool(labeled.all()):
        return target, prev
    pad, eos = dictionary.pad(), dictionary.eos()
    rows = (~labeled).nonzero().squeeze(1).tolist()
    keys = cache.keys(sample, rows) if cache is not None else []
    found = {r: cache.store[k] for r, k in zip(rows, keys) if k in cache.store} if keys else {}
    todo = [r for r in rows if r not in found]
    if cache is not None:
        cache.hits, cache.misses = cache.hits + len(found), cache.misses + len(todo)
    if todo:
        net = sample["net_input"]
        idx = torch.tensor(todo, device=net["src_tokens"].device)
        enc = model.encoder.reorder_encoder_out(encoder_out, idx) if encoder_out is not None else None
        hyps = greedy_transcripts(model, net["src_tokens"][idx], net["src_lengths"][idx], bos=eos, eos=eos, pad=pad,
                                  max_len=max_len, encoder_out=enc)
        for k, r in enumerate(todo):
            found[r] = hyps[k][hyps[k].ne(pad)]
            if keys:
                cache.store[keys[rows.index(r)]] = found[r]
    seqs = [t[t.ne(pad)] for t in target]
    for r, seq in found.items():
        seqs[r] = seq.to(target.device)
    return pad_right(seqs, pad), pad_right(seqs, pad, shift_eos_to_front=eos)
