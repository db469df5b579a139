# pipeloom.inference.detokenize: streamed text never splits a character or leaks part of a stop string.
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pipeloom.data import ByteTokenizer
from pipeloom.data.tokenizer import HFTokenizer, train_bpe
from pipeloom.inference import IncrementalDetokenizer, SamplingParams

BYTES = ByteTokenizer()
CORPUS = ["héllo wörld, ça va? 中文字符 and 日本語 too 🙂🚀 emoji", "def f(x):\n    return x + 1  # naïve",
          "STOP here, or STOPPED there; Ünïcödé ∑∫ √2 ≈ 1.414"] * 20


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A byte-level BPE trained here: its merges split some multi-byte characters across tokens."""
    return HFTokenizer(train_bpe(CORPUS, 300, str(tmp_path_factory.mktemp("bpe") / "tokenizer.json")))


def stream(tok, ids, params=None, chunks=None, **kwargs):
    """Feed ``ids`` in ``chunks`` (sizes; default one token at a time); return (deltas, detokenizer)."""
    det = IncrementalDetokenizer(tok, params or SamplingParams(max_tokens=10_000), **kwargs)
    deltas, at = [], 0
    for size in chunks or [1] * len(ids):
        deltas.append(det.add(ids[at:at + size]))
        at += size
    if not det.finished:
        deltas.append(det.finish())
    return deltas, det


def expected_stop(text, stops, include):
    """The text a stop string cuts: the occurrence that ends first (ties: the one that starts first)."""
    hits = [(text.find(s) + len(s), text.find(s), s) for s in stops if s in text]
    if not hits:
        return text, None
    end, start, s = min(hits)
    return text[:end if include else start], s


@pytest.mark.parametrize("char", ["é", "中", "🙂"])
def test_multibyte_characters_split_across_byte_tokens_wait_until_complete(char):
    ids = BYTES.encode(f"a{char}b")
    deltas, det = stream(BYTES, ids)
    width = len(char.encode())
    assert deltas[:1 + width + 1] == ["a"] + [""] * (width - 1) + [char, "b"]
    assert det.text == f"a{char}b" and det.finish_reason == "length"


def test_stop_string_split_across_tokens_is_never_emitted():
    text = "abc STOP def"
    for include in (False, True):
        params = SamplingParams(max_tokens=100, stop=("STOP",), include_stop_str_in_output=include)
        deltas, det = stream(BYTES, BYTES.encode(text), params)
        assert "S" not in "".join(deltas[:4 + 3]) and det.finished and det.finish_reason == "stop"
        assert det.text == ("abc STOP" if include else "abc ") and det.stop_reason == "STOP"
        assert len(det.token_ids) == len("abc STOP")  # the tokens after the stop are dropped


def test_held_stop_prefix_that_diverges_is_emitted():
    params = SamplingParams(max_tokens=100, stop=("STOP", "xyz"))
    deltas, det = stream(BYTES, BYTES.encode("aSTOxySTb"), params)
    assert deltas == ["a", "", "", "", "STO", "", "xy", "", "STb", ""]  # "x", "xy" could start "xyz"
    assert det.text == "aSTOxySTb" and det.finish_reason == "length" and det.stop_reason is None


def test_earliest_ending_stop_wins_within_one_chunk():
    params = SamplingParams(stop=("abcd", "bc"), max_tokens=100)
    deltas, det = stream(BYTES, BYTES.encode("xxabcdyy"), params, chunks=[8])
    assert deltas == ["xxa"] and det.stop_reason == "bc"


def test_stop_tokens_eos_ignore_eos_and_length():
    ids = BYTES.encode("hi!") + [0] + BYTES.encode("more")
    _, det = stream(BYTES, ids, SamplingParams(max_tokens=50), eos_token_id=0)
    assert (det.text, det.finish_reason, det.stop_reason, det.token_ids) == ("hi!", "stop", 0, ids[:4])
    _, det = stream(BYTES, ids, SamplingParams(max_tokens=50, ignore_eos=True), eos_token_id=0)
    assert det.text == BYTES.decode(ids) and det.finish_reason == "length"
    _, det = stream(BYTES, ids, SamplingParams(max_tokens=50, ignore_eos=True, stop_token_ids=(ord("m"),)),
                    eos_token_id=0, chunks=[len(ids)])
    assert det.text == "hi!\x00" and det.stop_reason == ord("m")
    deltas, det = stream(BYTES, ids, SamplingParams(max_tokens=2), eos_token_id=0)
    assert deltas == ["h", "i"] + [""] * 6 and det.finish_reason == "length" and det.token_ids == ids[:2]


def test_min_tokens_defers_stop_tokens_and_strings():
    params = SamplingParams(max_tokens=50, min_tokens=4, stop=("ab",), stop_token_ids=(ord("!"),))
    _, det = stream(BYTES, BYTES.encode("!ab?xab"), params)
    assert det.text == "!ab?x" and det.stop_reason == "ab"  # the first '!' and 'ab' came before token 4
    _, det = stream(BYTES, BYTES.encode("!ab?!x"), params)
    assert det.text == "!ab?" and det.stop_reason == ord("!") and len(det.token_ids) == 5
    _, det = stream(BYTES, BYTES.encode("xxabyy"), SamplingParams(max_tokens=50, min_tokens=3, stop=("ab",)))
    assert det.text == "xx" and det.stop_reason == "ab"  # 'ab' ends at token 4 >= min_tokens: it counts


def test_length_end_flushes_an_incomplete_character_and_a_held_stop_prefix():
    deltas, det = stream(BYTES, BYTES.encode("ok中")[:4], SamplingParams(max_tokens=4, stop=("k\ufffd?",)))
    assert "".join(deltas) == "ok\ufffd" == BYTES.decode(BYTES.encode("ok中")[:4])
    _, det = stream(BYTES, BYTES.encode("go ST"), SamplingParams(max_tokens=5, stop=("STOP",)))
    assert det.text == "go ST" and det.finish_reason == "length"


def test_token_id_only_requests_without_a_tokenizer():
    _, det = stream(None, [5, 6, 7, 2, 9], SamplingParams(max_tokens=9, stop_token_ids=(2,)))
    assert det.text == "" and det.token_ids == [5, 6, 7, 2] and det.stop_reason == 2
    with pytest.raises(ValueError, match=r"stop=\('x',\) needs a tokenizer"):
        IncrementalDetokenizer(None, SamplingParams(stop="x"))


def test_bpe_tokens_stream_the_decoded_text_with_a_prompt_context(bpe):
    text = "ça va? 中文 🙂🚀 naïve STOP"
    ids = bpe.encode(text)
    assert len(ids) < len(text.encode())  # merges happened
    assert any("\ufffd" in bpe.decode(ids[:k]) for k in range(1, len(ids)))  # some token splits a character
    deltas, det = stream(bpe, ids, prompt_ids=bpe.encode("prompt: "))
    assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)
    _, det = stream(bpe, ids, SamplingParams(max_tokens=100, stop=("🚀",)))
    assert det.text == "ça va? 中文 🙂" and det.stop_reason == "🚀"


TEXT = st.text(st.characters(blacklist_categories=("Cs",), max_codepoint=0x1F9FF), max_size=40)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT, data=st.data(), use_bpe=st.booleans(), include=st.booleans())
def test_any_text_any_split_streams_exactly_the_decoded_text(bpe, text, data, use_bpe, include):
    tok = bpe if use_bpe else BYTES
    ids = tok.encode(text)
    chunks = []
    while sum(chunks) < len(ids):
        chunks.append(data.draw(st.integers(1, 4)))
    stops = ()
    if text and data.draw(st.booleans()):
        a = data.draw(st.integers(0, len(text) - 1))
        stops = (text[a:a + data.draw(st.integers(1, 4))], data.draw(TEXT.filter(bool)))
    params = SamplingParams(max_tokens=10_000, stop=stops, include_stop_str_in_output=include)
    det = IncrementalDetokenizer(tok, params)
    want, stop = expected_stop(tok.decode(ids), stops, include)
    at = 0
    for size in chunks:
        det.add(ids[at:at + size])
        at += size
        assert want.startswith(det.text)  # nothing emitted is ever taken back
    det.finish()
    assert det.text == want and det.stop_reason == stop
    assert det.finish_reason == ("stop" if stop is not None else "length")


@settings(max_examples=60, deadline=None)
@given(raw=st.binary(max_size=30), data=st.data())
def test_invalid_utf8_bytes_stream_like_decode(raw, data):
    ids = list(raw)
    chunks = []
    while sum(chunks) < len(ids):
        chunks.append(data.draw(st.integers(1, 3)))
    deltas, det = stream(BYTES, ids, chunks=chunks)
    assert "".join(deltas) == BYTES.decode(ids) == det.text
