from . import librispeech_asr  # noqa: F401
