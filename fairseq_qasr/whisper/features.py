"""Whisper's log-mel features in plain torch (bit-for-bit the recipe of openai-whisper's audio.py).

80 mel bins, n_fft 400 (25 ms), hop 160 (10 ms), periodic Hann window, power spectrum of a centred
(reflect-padded) STFT with the last frame dropped, Slaney-scale / Slaney-normalised mel filters
(openai-whisper's mel_filters.npz when installed, else the identical torchaudio Slaney filterbank),
``log10(clamp(x, 1e-10))``, dynamic range clamp to ``max - 8`` over the whole (padded) window, then
``(x + 4) / 4``.

30-s window semantics (always 3000 frames out; see ``whisper_log_mel``): ``window="transcribe"``
reproduces the first window of ``whisper.transcribe`` (log-mel of audio + 30 s of zeros, content
frames kept, zero-valued frames after them); ``window="pad_audio"`` reproduces
``whisper.log_mel_spectrogram(whisper.pad_or_trim(audio))`` (audio zero-padded before the STFT).
Audio longer than 30 s is cut to its first window (whisper.transcribe would go on with further
windows; one fairseq sample = one window).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
N_MELS = 80
CHUNK_LENGTH = 30
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480000
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000


@functools.lru_cache(maxsize=4)
def mel_filters(n_mels: int = N_MELS, source: str = "auto") -> torch.Tensor:
    """[n_mels, n_fft // 2 + 1] Slaney mel filterbank.

    ``source="npz"``: openai-whisper's ``assets/mel_filters.npz`` (bit-identical features; used by
    ``auto`` when the package is installed); ``"torchaudio"``: ``melscale_fbanks(norm="slaney",
    mel_scale="slaney")``, equal to the npz within 1e-7 (features within ~1e-5).
    """
    if source in ("auto", "npz"):
        path = _whisper_filters_path()
        if path is not None:
            import numpy as np

            with np.load(path, allow_pickle=False) as f:
                return torch.from_numpy(f[f"mel_{n_mels}"]).float()
        if source == "npz":
            raise FileNotFoundError("openai-whisper's assets/mel_filters.npz not found (pip install openai-whisper)")
    import torchaudio.functional as AF

    fb = AF.melscale_fbanks(
        n_freqs=N_FFT // 2 + 1, f_min=0.0, f_max=SAMPLE_RATE / 2, n_mels=n_mels,
        sample_rate=SAMPLE_RATE, norm="slaney", mel_scale="slaney",
    )
    return fb.T.contiguous().float()


def _whisper_filters_path():
    import importlib.util
    import os

    spec = importlib.util.find_spec("whisper")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "assets", "mel_filters.npz")
    return path if os.path.isfile(path) else None


@functools.lru_cache(maxsize=4)
def _hann(device_str: str) -> torch.Tensor:
    return torch.hann_window(N_FFT, device=device_str)


def pad_or_trim(audio: torch.Tensor, length: int = N_SAMPLES) -> torch.Tensor:
    """Zero-pad or trim the last dimension to ``length`` samples (openai-whisper's pad_or_trim)."""
    n = audio.shape[-1]
    if n > length:
        return audio[..., :length]
    if n < length:
        return F.pad(audio, (0, length - n))
    return audio


def log_mel_spectrogram(audio: torch.Tensor, n_mels: int = N_MELS, padding: int = 0,
                        filters: str = "auto") -> torch.Tensor:
    """openai-whisper's ``log_mel_spectrogram`` on a float tensor: returns [n_mels, n_frames]."""
    audio = audio.float()
    if padding > 0:
        audio = F.pad(audio, (0, padding))
    window = _hann(str(audio.device))
    stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=window, return_complex=True)
    magnitudes = stft[..., :-1].abs() ** 2
    mel_spec = mel_filters(n_mels, filters).to(audio.device) @ magnitudes
    log_spec = torch.clamp(mel_spec, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


WINDOWS = ("transcribe", "pad_audio")


def whisper_log_mel(waveform: torch.Tensor, n_mels: int = N_MELS, window: str = "transcribe") -> torch.Tensor:
    """Features for one utterance as the task consumes them: [3000, n_mels] (time-major).

    ``waveform``: 1-D float tensor, 16 kHz, values in [-1, 1]. The result always has exactly 3000
    frames (one 30-s window); no further padding, CMVN or SpecAugment may be applied. ``window``:

    - ``"transcribe"`` (default): the first window of ``whisper.transcribe`` — log-mel of the audio
      followed by 30 s of zeros, its first ``min(3000, n_samples // 160)`` frames, then padded with
      zero-valued frames to 3000 (``pad_or_trim`` of the mel segment);
    - ``"pad_audio"``: ``whisper.log_mel_spectrogram(whisper.pad_or_trim(audio))`` as in OpenAI's
      LibriSpeech notebook / ``whisper.decode`` examples (the audio, not the mel, is padded).
    """
    if waveform.dim() != 1:
        raise ValueError(f"whisper_log_mel expects a 1-D waveform, got shape {tuple(waveform.shape)}")
    waveform = waveform.float()
    if window == "pad_audio":
        return log_mel_spectrogram(pad_or_trim(waveform), n_mels).T.contiguous()
    if window != "transcribe":
        raise ValueError(f"whisper features: window must be one of {WINDOWS}, got {window!r}")
    content = min(N_FRAMES, waveform.numel() // HOP_LENGTH)
    mel = log_mel_spectrogram(waveform, n_mels, padding=N_SAMPLES)[:, :content]
    return pad_or_trim(mel, N_FRAMES).T.contiguous()


def build_whisper_features(config=None):
    """Feature function for a data config's ``features`` section ``{type: whisper[, window: ...,
    num_mel_bins: 80]}``: returns ``waveform -> [3000, n_mels]``."""
    config = dict(config or {})
    window = config.get("window", "transcribe")
    n_mels = int(config.get("num_mel_bins", N_MELS))
    if window not in WINDOWS:
        raise ValueError(f"features.window must be one of {WINDOWS}, got {window!r}")

    def whisper_features(waveform: torch.Tensor) -> torch.Tensor:
        return whisper_log_mel(waveform, n_mels, window)

    return whisper_features
