"""Audio file inspection and loading with clear errors (soundfile + torchaudio resampling)."""
from __future__ import annotations

import os

import numpy as np
import soundfile as sf
import torch

from .errors import DataError, located

TARGET_SAMPLE_RATE = 16000
FRAME_SHIFT_SAMPLES = 160  # 10 ms at 16 kHz

RESAMPLE_FLAG = "--resample-audio"

__all__ = [
    "TARGET_SAMPLE_RATE",
    "audio_info",
    "read_audio",
    "check_sample_rate",
    "num_samples_at",
    "n_frames_10ms",
]


def num_samples_at(num_samples: int, orig_rate: int, new_rate: int = TARGET_SAMPLE_RATE) -> int:
    """Length after resampling ``num_samples`` from ``orig_rate`` to ``new_rate``.

    Same rule as ``torchaudio.functional.resample``: ``ceil(num_samples * new_rate / orig_rate)``.
    """
    if orig_rate == new_rate:
        return int(num_samples)
    return -(-int(num_samples) * int(new_rate) // int(orig_rate))


def n_frames_10ms(num_samples: int, sample_rate: int = TARGET_SAMPLE_RATE) -> int:
    """Number of 10-ms frames of the manifest: ``num_samples_at_16k // 160``."""
    return num_samples_at(num_samples, sample_rate, TARGET_SAMPLE_RATE) // FRAME_SHIFT_SAMPLES


def _check_exists(path: str, where: str) -> None:
    if not os.path.exists(path):
        raise DataError(located(where, f"audio file not found: {path}"))
    if not os.path.isfile(path):
        raise DataError(located(where, f"audio path is not a file: {path}"))


def _corrupt(path: str, where: str, err: BaseException) -> DataError:
    detail = str(err).replace(f"Error opening {path!r}: ", "").strip() or type(err).__name__
    return DataError(located(where, f"cannot decode audio file {path} (corrupt or truncated?): {detail}"))


def _rate_error(path: str, rate: int, expected: int, where: str) -> DataError:
    return DataError(
        located(where, f"{path} is {rate} Hz, expected {expected} Hz; pass {RESAMPLE_FLAG} to resample")
    )


def check_sample_rate(
    path: str | os.PathLike, rate: int, expected: int = TARGET_SAMPLE_RATE, resample: bool = False, where: str = ""
) -> None:
    """Raise DataError if ``rate != expected`` and resampling was not asked for."""
    if rate != expected and not resample:
        raise _rate_error(os.fspath(path), rate, expected, where)


def _empty_error(path: str, where: str) -> DataError:
    return DataError(located(where, f"audio file is empty (0 samples): {path}"))


def audio_info(path: str | os.PathLike, where: str = "") -> tuple[int, int]:
    """Return ``(sample_rate, num_samples)`` of an audio file, without decoding all of it.

    Raises DataError for a missing file, an unreadable/corrupt file (including a truncated
    FLAC: the last sample is decoded as a cheap check) or an empty file. The sample rate
    is not checked here (callers compare it to what they need).
    """
    path = os.fspath(path)
    _check_exists(path, where)
    try:
        with sf.SoundFile(path) as f:
            rate, frames = int(f.samplerate), int(f.frames)
            if frames > 0:
                f.seek(frames - 1)
                if len(f.read(1, dtype="float32", always_2d=True)) != 1:
                    raise RuntimeError("last sample could not be read")
    except (sf.SoundFileError, RuntimeError, OSError) as err:  # LibsndfileError is a RuntimeError
        raise _corrupt(path, where, err) from None
    if frames <= 0:
        raise _empty_error(path, where)
    return rate, frames


def read_audio(
    path: str | os.PathLike,
    sample_rate: int = TARGET_SAMPLE_RATE,
    resample: bool = False,
    where: str = "",
) -> torch.Tensor:
    """Decode an audio file to a 1-D float32 tensor in [-1, 1] at ``sample_rate``.

    Multi-channel audio is averaged to mono. A file at another rate is an error unless
    ``resample`` (then ``torchaudio.functional.resample`` is used). Raises DataError for a
    missing, corrupt/truncated or empty file and for a wrong sample rate.
    """
    path = os.fspath(path)
    _check_exists(path, where)
    try:
        with sf.SoundFile(path) as f:
            rate, frames = int(f.samplerate), int(f.frames)
            if rate != sample_rate and not resample:
                raise _rate_error(path, rate, sample_rate, where)
            data = f.read(dtype="float32", always_2d=True)
    except DataError:
        raise
    except (sf.SoundFileError, RuntimeError, OSError) as err:
        raise _corrupt(path, where, err) from None
    if data.shape[0] == 0:
        raise _empty_error(path, where)
    if data.shape[0] != frames:
        raise DataError(
            located(where, f"cannot decode audio file {path} (truncated?): header says {frames} samples, "
                    f"decoded {data.shape[0]}")
        )
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    wav = torch.from_numpy(np.ascontiguousarray(mono, dtype=np.float32))
    if rate != sample_rate:
        import torchaudio.functional as AF  # lazy: only needed when resampling

        wav = AF.resample(wav, rate, sample_rate)
    return wav.clamp_(-1.0, 1.0)
