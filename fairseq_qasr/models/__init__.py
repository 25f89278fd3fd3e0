from . import qtransformer_conv  # noqa: F401
