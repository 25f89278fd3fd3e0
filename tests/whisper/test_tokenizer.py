from argparse import Namespace

import pytest
import torch

pytest.importorskip("tiktoken")
from fairseq_qasr.whisper.tokenizer import WhisperVocab, get_tokenizer  # noqa: E402

try:
    get_tokenizer(False)
except ImportError as e:  # openai-whisper (vocabulary files) missing
    pytest.skip(str(e), allow_module_level=True)


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer(False)


@pytest.fixture(scope="module")
def fairseq_registered():
    import fairseq  # noqa: F401

    import fairseq_qasr
    import fairseq_qasr.whisper.register  # noqa: F401

    fairseq_qasr.register()


def test_vocab_mapping_is_a_bijection(tok):
    v = WhisperVocab.from_tokenizer(tok)
    assert (tok.encoding.n_vocab, tok.eot, tok.sot) == (51864, 50256, 50257)
    assert len(v) == 51866
    ids = v.whisper_ids()
    assert ids[0] == tok.sot and ids[2] == tok.eot and ids[1] == ids[3] == -1
    assert sorted(ids[ids >= 0].tolist()) == list(range(51864))  # every Whisper token exactly once
    for idx in [0, 2, 4, 5, 50259, 50260, 50261, 51865]:
        assert v.to_fairseq(v.to_whisper(idx)) == idx
    assert v.to_fairseq(0) == 4 and v.to_fairseq(50255) == 50259 and v.to_fairseq(50258) == 50260
    assert v.to_fairseq(tok.no_timestamps) == tok.no_timestamps + 2


def test_dictionary_file(tmp_path, tok):
    from fairseq.data import Dictionary

    v = WhisperVocab.from_tokenizer(tok)
    v.write_dict(str(tmp_path / "dict.txt"))
    d = Dictionary.load(str(tmp_path / "dict.txt"))
    assert len(d) == len(v)
    assert (d.bos(), d.pad(), d.eos(), d.unk()) == (0, 1, 2, 3)
    for wid in [0, 220, 50255, 50258, 50362, 51863]:
        assert d.index(str(wid)) == v.to_fairseq(wid)
        assert v.symbol_to_whisper(d[v.to_fairseq(wid)]) == wid


def test_bpe_round_trip_and_ids(fairseq_registered, tok, tmp_path):
    from fairseq.data import Dictionary, encoders

    bpe = encoders.build_bpe(Namespace(bpe="whisper"))
    text = "HE HOPED THERE WOULD BE STEW FOR DINNER, \"TURNIPS\" & <|endoftext|> 25%"
    enc = bpe.encode(text)
    assert [int(t) for t in enc.split()] == tok.encoding.encode(text, disallowed_special=())
    assert bpe.decode(enc) == text
    v = WhisperVocab.from_tokenizer(tok)
    v.write_dict(str(tmp_path / "dict.txt"))
    d = Dictionary.load(str(tmp_path / "dict.txt"))
    line = d.encode_line(bpe.encode(" Hello world."), add_if_not_exist=False, append_eos=True)
    assert d.unk() not in line.tolist()
    s = d.string(line)  # what fairseq-generate hands to bpe.decode (eos stripped)
    assert bpe.decode(s) == "Hello world."
    assert bpe.decode("<s> " + s + " </s> <pad> <unk>") == "Hello world."


def test_whisper_wer_scorer(fairseq_registered):
    from fairseq.scoring import build_scorer

    cfg = Namespace(scoring="whisper_wer", wer_tokenizer="none", wer_remove_punct=False,
                    wer_char_level=False, wer_lowercase=False)
    sc = build_scorer(cfg, None)
    sc.add_string("MISTER QUILTER IS THE APOSTLE OF THE MIDDLE CLASSES",
                  "Mr. Quilter is the apostle of the middle classes.")
    sc.add_string("TWENTY FIVE COLOURS", "25 colors!")
    assert sc.score() == 0.0
    assert sc.counts.ref_words == 9 + 2  # "twenty five colours" -> "25 colors"
    sc.add_string("A B C D", "A X C")  # 2 errors / 4 words
    assert sc.score() == pytest.approx(100.0 * 2 / 15)
    r = sc.result_string()
    assert "WER (whisper-normalized): 13.33" in r and "plain WER: " in r


def test_normalizer_matches_openai_whisper(whisper_pkg):
    from whisper.normalizers import EnglishTextNormalizer

    from fairseq_qasr.whisper.normalizer import normalize

    ref = EnglishTextNormalizer()
    for s in ["Mr. Quilter's manner, Sir!", "It's twenty-five past 3 o'clock.", "COLOUR (laughs) hmm"]:
        assert normalize(s) == ref(s)
