import pytest
import soundfile as sf
import torch

from fairseq_qasr.whisper import features as W

from whisper_testutil import read_split


def test_shape_and_window_semantics():
    short = torch.randn(16000) * 0.1
    long = torch.randn(35 * 16000) * 0.1
    assert W.whisper_log_mel(short).shape == (3000, 80)
    assert W.whisper_log_mel(long).shape == (3000, 80)
    # > 30 s: pad_audio trims the audio to 30 s; transcribe keeps the first 3000 frames of the full log-mel
    assert torch.equal(W.whisper_log_mel(long, window="pad_audio"), W.whisper_log_mel(long[: W.N_SAMPLES], window="pad_audio"))
    assert torch.equal(W.whisper_log_mel(long), W.log_mel_spectrogram(long, padding=W.N_SAMPLES)[:, :3000].T)
    with pytest.raises(ValueError, match="1-D"):
        W.whisper_log_mel(torch.zeros(2, 16000))


def test_torchaudio_filters_match_whisper_npz(whisper_pkg):
    ta = W.mel_filters.__wrapped__(80, "torchaudio")
    npz = W.mel_filters.__wrapped__(80, "npz")
    assert ta.shape == npz.shape == (80, 201)
    assert (ta - npz).abs().max() < 1e-6


@pytest.mark.parametrize("split", ["dev-clean", "test-other"])
def test_parity_with_openai_whisper(librispeech, whisper_pkg, split):
    whisper = whisper_pkg
    for uid, flac, _ in read_split(split)[::7][:3]:
        audio = torch.from_numpy(sf.read(str(flac), dtype="float32")[0])
        # default window: the first window of whisper.transcribe
        full = whisper.log_mel_spectrogram(audio, padding=W.N_SAMPLES)
        ref = whisper.pad_or_trim(full[:, : min(full.shape[-1] - W.N_FRAMES, W.N_FRAMES)], W.N_FRAMES)
        ours = W.whisper_log_mel(audio)  # [3000, 80]
        assert ours.shape == (3000, 80)
        assert (ours.T - ref).abs().max().item() <= 1e-4, uid
        # pad_audio window: whisper.log_mel_spectrogram(whisper.pad_or_trim(audio))
        ref_pad = whisper.log_mel_spectrogram(whisper.pad_or_trim(audio))
        assert (W.whisper_log_mel(audio, window="pad_audio").T - ref_pad).abs().max().item() <= 1e-4, uid
        # torchaudio filterbank path (no openai-whisper needed) is within 1e-4 as well
        ta = W.log_mel_spectrogram(W.pad_or_trim(audio), filters="torchaudio")
        assert (ta - ref_pad).abs().max().item() <= 1e-4, uid


def test_windows_and_config(whisper_pkg):
    whisper = whisper_pkg
    torch.manual_seed(0)
    audio = torch.randn(5 * 16000 + 77) * 0.05
    tr = W.whisper_log_mel(audio)  # default: whisper.transcribe's first window
    full = whisper.log_mel_spectrogram(audio, padding=W.N_SAMPLES)
    ref = whisper.pad_or_trim(full[:, : full.shape[-1] - W.N_FRAMES], W.N_FRAMES)
    assert torch.equal(tr.T, ref)
    assert (tr[audio.numel() // 160:] == 0).all()  # zero-valued frames after the content
    pad = W.whisper_log_mel(audio, window="pad_audio")
    assert torch.equal(pad.T, whisper.log_mel_spectrogram(whisper.pad_or_trim(audio)))
    assert not torch.equal(pad, tr)
    assert torch.equal(W.build_whisper_features({"type": "whisper"})(audio), tr)
    assert torch.equal(W.build_whisper_features({"type": "whisper", "window": "pad_audio"})(audio), pad)
    with pytest.raises(ValueError, match="window"):
        W.build_whisper_features({"window": "bogus"})
