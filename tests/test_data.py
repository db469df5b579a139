# pipeloom.data: tokenizers, the corpus split, token-stream files, cached preparation, deterministic batches.
import os

import numpy as np
import pytest
import torch
from pipeloom.data import (
    ByteTokenizer,
    TokenBatches,
    TokenStream,
    eval_batches,
    find_files,
    prepare_data,
    write_stream,
)
from pipeloom.data.corpus import in_validation, read_split
from pipeloom.data.stream import HEADER_BYTES


def make_corpus(root, n=40, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(root / "pkg", exist_ok=True)
    for i in range(n):
        words = rng.choice(["def", "return", "self", "x", "=", "(", ")", ":", "\n", "    ", "import", "y"], 300)
        (root / "pkg" / f"mod{i:02d}.py").write_text(f"# module {i}\n" + " ".join(words))
    (root / "pkg" / "empty.py").write_text("")
    return str(root / "pkg" / "*.py")


def test_byte_tokenizer_round_trips_any_text():
    tok = ByteTokenizer()
    text = "héllo\n\tworld ∑ 🙂"
    ids = tok.encode(text)
    assert max(ids) < 256 and tok.decode(ids) == text
    assert tok.spec == {"kind": "byte", "vocab_size": 256}


def test_stream_file_header_memmap_and_truncation(tmp_path):
    path = str(tmp_path / "s.bin")
    ids = np.random.default_rng(1).integers(0, 300, 1000)
    write_stream(path, [ids[:400], ids[400:]], vocab_size=300, split="train")
    stream = TokenStream(path)
    assert len(stream) == 1000 and stream.vocab_size == 300 and stream.header["split"] == "train"
    assert stream.tokens.dtype == np.uint16 and np.array_equal(stream.tokens[:], ids)
    assert open(path, "rb").read(16) == b"PIPELOOM-TOKENS\n"
    with open(path, "r+b") as f:
        f.truncate(HEADER_BYTES + 1000)  # half the ids gone
    with pytest.raises(ValueError, match="truncated or corrupted"):
        TokenStream(path)
    with pytest.raises(ValueError, match="vocab_size"):
        write_stream(str(tmp_path / "bad.bin"), [np.array([5, 400])], vocab_size=300)


def test_split_is_by_content_hash_deterministic_and_disjoint(tmp_path):
    pattern = make_corpus(tmp_path)
    root, files = find_files(pattern)
    assert [f.rel for f in files] == sorted(f.rel for f in files) and len(files) == 41
    train, val = read_split(files, 0.25)
    train2, val2 = read_split(files, 0.25)
    assert train == train2 and val == val2 and val and train
    assert not set(train) & set(val)
    assert all(in_validation(c, 0.25) for c in val)
    assert in_validation(b"same bytes", 0.5) == in_validation(b"same bytes", 0.5)


def test_default_corpus_is_the_stdlib_without_site_packages():
    root, files = find_files(None)
    rels = {f.rel for f in files}
    assert "os.py" in rels and "json/__init__.py" in rels
    assert not any("site-packages" in r for r in rels)


def test_prepare_data_caches_streams_and_reuses_them(tmp_path):
    pattern = make_corpus(tmp_path / "corpus")
    data = prepare_data(files=pattern, val_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    assert data.tokenizer.vocab_size == 256 and len(data.train) > len(data.val) > 0
    text = ByteTokenizer().decode(data.train.tokens[:200].tolist())
    assert text.startswith("# module")
    stamp = os.stat(data.train.path).st_mtime_ns
    again = prepare_data(files=pattern, val_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    assert again.train.path == data.train.path and os.stat(again.train.path).st_mtime_ns == stamp
    other = prepare_data(files=pattern, val_fraction=0.4, cache_dir=str(tmp_path / "cache"))
    assert other.train.path != data.train.path  # a different split is a different cache entry
    with pytest.raises(FileNotFoundError, match="data.files"):
        prepare_data(files=str(tmp_path / "nothing" / "*.txt"), cache_dir=str(tmp_path / "cache"))


def test_bpe_trained_locally_round_trips(tmp_path):
    pytest.importorskip("tokenizers")
    pattern = make_corpus(tmp_path / "corpus")
    data = prepare_data(files=pattern, tokenizer="bpe", bpe_vocab_size=300, cache_dir=str(tmp_path / "cache"))
    tok = data.tokenizer
    assert tok.vocab_size <= 300 and tok.spec["kind"] == "tokenizer.json"
    sample = "def x(self):\n    return y"
    assert tok.decode(tok.encode(sample)) == sample
    assert len(tok.encode(sample)) < len(sample.encode())  # merges learned
    assert len(data.train) < sum(os.path.getsize(f.path) for f in find_files(pattern)[1])
    # the trained tokenizer.json doubles as an "hf" tokenizer (a checkpoint's own)
    hf = prepare_data(files=pattern, tokenizer="hf", tokenizer_path=tok.path, cache_dir=str(tmp_path / "cache"))
    assert hf.train.path == data.train.path


def stream_of(tmp_path, n=5000, seed=0):
    path = str(tmp_path / "toy.bin")
    write_stream(path, [np.random.default_rng(seed).integers(0, 256, n)], vocab_size=256)
    return TokenStream(path)


def test_batches_are_a_function_of_seed_and_step(tmp_path):
    stream = stream_of(tmp_path)
    a, b = TokenBatches(stream, 16, 8, seed=3), TokenBatches(stream, 16, 8, seed=3)
    assert np.array_equal(a.global_batch(7), b.global_batch(7))  # a fresh object (a resumed run) agrees
    assert not np.array_equal(a.global_batch(7), a.global_batch(8))
    assert not np.array_equal(a.global_batch(7), TokenBatches(stream, 16, 8, seed=4).global_batch(7))
    x, y = a.microbatches(7)[0]
    assert x.shape == (8, 16) and torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one


def test_dp_shards_and_microbatches_tile_the_global_batch(tmp_path):
    batches = TokenBatches(stream_of(tmp_path), 16, 8, seed=0)
    full = torch.from_numpy(batches.global_batch(2))
    rows = []
    for r in range(2):
        mbs = batches.microbatches(2, dp_rank=r, dp=2, microbatches=2)
        assert len(mbs) == 2 and mbs[0][0].shape == (2, 16)
        rows += [torch.cat([x, y[:, -1:]], dim=1) for x, y in mbs]
    assert torch.equal(torch.cat(rows), full)
    with pytest.raises(ValueError, match="divisible by dp"):
        batches.microbatches(0, dp_rank=0, dp=3, microbatches=1)


def test_epoch_permutation_covers_every_window_once(tmp_path):
    batches = TokenBatches(stream_of(tmp_path, n=16 * 40 + 1), 16, 4, seed=1)
    assert batches.windows == 40
    firsts = [tuple(row) for s in range(10) for row in batches.global_batch(s)]
    windows = {tuple(np.asarray(batches.stream.tokens[w * 16: w * 16 + 17])) for w in range(40)}
    assert set(firsts) == windows and len(firsts) == 40


def test_eval_batches_are_fixed(tmp_path):
    stream = stream_of(tmp_path)
    a, b = eval_batches(stream, 16, 4, 3), eval_batches(stream, 16, 4, 3)
    assert len(a) == 3 and a[0].shape == (4, 17) and all(torch.equal(x, y) for x, y in zip(a, b))
