"""Acoustic features: Kaldi-compatible log-mel filterbanks (torchaudio), utterance CMVN, SpecAugment.

``build_feature_extractor(config)`` turns the ``features`` section of a data config into a callable
``waveform (1-D, 16 kHz, [-1, 1]) -> features (frames, bins)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional

import torch
import torchaudio.compliance.kaldi as kaldi
from torch import Tensor

FeatureFn = Callable[[Tensor], Tensor]


def kaldi_fbank(waveform: Tensor, sample_rate: int = 16000, num_mel_bins: int = 80) -> Tensor:
    """80-dim log-mel filterbank, 25-ms windows every 10 ms, as Kaldi computes it (no dither: deterministic)."""
    if waveform.numel() < int(0.025 * sample_rate):
        raise ValueError(f"audio of {waveform.numel()} samples is shorter than one 25-ms analysis window")
    return kaldi.fbank(waveform.unsqueeze(0) * 32768.0, num_mel_bins=num_mel_bins,
                       sample_frequency=sample_rate, dither=0.0, energy_floor=0.0)


def utterance_cmvn(feats: Tensor, eps: float = 1e-5) -> Tensor:
    """Normalize every feature bin to zero mean and unit variance over the utterance."""
    mean = feats.mean(dim=0, keepdim=True)
    std = feats.std(dim=0, unbiased=False, keepdim=True)
    return (feats - mean) / (std + eps)


@dataclass
class SpecAugment:
    """SpecAugment (Park et al. 2019) frequency and time masking, masked with the utterance mean."""

    freq_mask_F: int = 27
    freq_mask_N: int = 1
    time_mask_T: int = 40
    time_mask_N: int = 1
    time_mask_p: float = 1.0

    def __call__(self, feats: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        feats = feats.clone()
        frames, bins = feats.shape
        fill = feats.mean()

        def rand_int(high: int) -> int:
            return int(torch.randint(0, max(high, 0) + 1, (1,), generator=generator))

        for _ in range(self.freq_mask_N):
            width = rand_int(min(self.freq_mask_F, bins))
            start = rand_int(bins - width)
            feats[:, start : start + width] = fill
        max_time = min(self.time_mask_T, int(self.time_mask_p * frames))
        for _ in range(self.time_mask_N):
            width = rand_int(max_time)
            start = rand_int(frames - width)
            feats[start : start + width, :] = fill
        return feats


def build_feature_extractor(config: Mapping[str, Any], sample_rate: int = 16000) -> FeatureFn:
    """``config``: ``{type: fbank, num_mel_bins: 80, cmvn: utterance|none}`` or ``{type: whisper}``."""
    kind = config.get("type", "fbank")
    if kind == "fbank":
        bins = int(config.get("num_mel_bins", 80))
        cmvn = config.get("cmvn", "utterance")
        if cmvn not in ("utterance", "none", None):
            raise ValueError(f"features.cmvn must be 'utterance' or 'none', got {cmvn!r}")

        def fbank(waveform: Tensor) -> Tensor:
            feats = kaldi_fbank(waveform, sample_rate, bins)
            return utterance_cmvn(feats) if cmvn == "utterance" else feats

        return fbank
    if kind == "whisper":
        from fairseq_qasr.whisper.features import build_whisper_features  # 30-s windows, Whisper's log-mel

        return build_whisper_features(dict(config))
    raise ValueError(f"features.type must be 'fbank' or 'whisper', got {kind!r}")


def build_specaugment(config: Optional[Dict[str, Any]]) -> Optional[SpecAugment]:
    if not config:
        return None
    unknown = set(config) - set(SpecAugment.__dataclass_fields__)
    if unknown:
        raise ValueError(f"specaugment: unknown keys {sorted(unknown)}; allowed: {sorted(SpecAugment.__dataclass_fields__)}")
    return SpecAugment(**config)
