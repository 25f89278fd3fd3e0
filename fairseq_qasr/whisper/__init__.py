"""OpenAI Whisper inside fairseq-qasr.

Submodules (import what you need; this package import itself is light and pulls in neither fairseq
nor the openai-whisper package):

- ``fetch``      obtain + sha256-verify official checkpoints (plain Python)
- ``features``   Whisper log-mel features in plain torch (``whisper_log_mel``)
- ``tokenizer``  Whisper's tiktoken encoding and the fairseq-index <-> Whisper-id mapping
- ``convert``    Whisper checkpoint (OpenAI .pt or CTranslate2 model.bin) -> qtransformer_conv state dict
- ``importer``   writes the fairseq checkpoint + dict.txt + config.yaml (imports fairseq)
- ``normalizer`` Whisper's EnglishTextNormalizer (from the openai-whisper package)
- ``bpe``        fairseq BPE ``--bpe whisper`` (imports fairseq)
- ``scorer``     fairseq scorer ``--scoring whisper_wer`` (imports fairseq)
- ``register``   imports ``bpe`` and ``scorer`` so that fairseq sees the registrations
"""
