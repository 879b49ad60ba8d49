"""Cosine residual codebook: round trip, monotone reconstruction, balance, persistence, switching codebooks."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from models.codebook import CodebookConfig, ResidualCodebook, transcode


@pytest.fixture(scope="module")
def pool() -> np.ndarray:
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(40, 32))
    return (centres[rng.integers(0, 40, 3000)] + 0.6 * rng.normal(size=(3000, 32))).astype(np.float32)


@pytest.fixture(scope="module")
def book(pool) -> ResidualCodebook:
    return ResidualCodebook.fit(pool, CodebookConfig(dim=32, layers=4, codewords=64))


def test_reconstruction_rises_with_layers(book, pool):
    cos = book.reconstruction_cosine(pool)
    assert len(cos) == 4
    assert all(b > a for a, b in itertools.pairwise(cos)), cos
    assert cos[0] > 0.5 and cos[-1] > cos[0] + 0.05


def test_encode_decode_round_trip_through_bytes(book, pool):
    enc = book.encode(pool[:50])
    assert enc.codes.dtype == np.uint8 and enc.codes.shape == (50, 4)
    packed = b"".join(enc.codes[i].tobytes() + enc.alphas[i].tobytes() for i in range(50))  # L codes, L alphas
    assert len(packed) == 50 * book.cfg.bytes_per_item == 50 * 8
    np.testing.assert_allclose(book.from_bytes(packed, 50), book.decode(enc.codes, enc.alphas), rtol=0, atol=0)
    assert enc.records().tobytes() == packed


def test_first_layer_picks_max_cosine_codeword(book, pool):
    x = pool[:20]
    codes = book.encode(x).codes[:, 0]
    c = book.codewords[0]
    cos = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ c.T  # codewords are unit length
    np.testing.assert_array_equal(codes, cos.argmax(axis=1))


def test_residual_is_orthogonal_to_chosen_codeword_before_quantisation():
    rng = np.random.default_rng(0)
    e = rng.normal(size=(1, 8)).astype(np.float32)
    c = rng.normal(size=(4, 8)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    codes, alpha = ResidualCodebook._assign(e, c)
    residual = e - alpha[:, None] * c[codes]
    assert abs(float(residual[0] @ c[codes[0]])) < 1e-5


def test_balanced_no_collapse(book, pool):
    for layer in book.utilisation(pool):
        assert layer["used"] > 0.9 and layer["entropy"] > 0.85, layer


def test_save_load(tmp_path, book, pool):
    book.save(tmp_path)
    again = ResidualCodebook.load(tmp_path)
    assert again.cfg == book.cfg
    enc = book.encode(pool[:10])
    np.testing.assert_array_equal(again.encode(pool[:10]).codes, enc.codes)


def test_bad_input_is_refused(book):
    with pytest.raises(ValueError, match="shape"):
        book.encode(np.zeros((2, 31), np.float32))
    bad = np.zeros((1, 32), np.float32)
    bad[0, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        book.encode(bad)
    with pytest.raises(ValueError, match="at least"):
        ResidualCodebook.fit(np.ones((10, 32), np.float32), CodebookConfig(dim=32, codewords=64))


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_blob_round_trip_and_fingerprint(book, pool):
    again = ResidualCodebook.from_blob(book.to_blob())
    assert again.cfg == book.cfg and again.fingerprint == book.fingerprint
    np.testing.assert_array_equal(again.codewords, book.codewords)
    other = ResidualCodebook.fit(pool, CodebookConfig(dim=32, layers=4, codewords=64, seed=1))
    assert other.fingerprint != book.fingerprint


def test_transcode_to_a_new_codebook_keeps_the_items(book, pool):
    """A switch re-encodes stored codes (the raw vectors are gone): the result decodes with the new
    codebook, even one with another record size, and stays close to the item."""
    new = ResidualCodebook.fit(pool, CodebookConfig(dim=32, layers=3, codewords=64, seed=5))
    x = pool[:200]
    old_records = book.encode(x).records().tobytes()
    moved = transcode(old_records, 200, book, new)
    assert len(moved) == 200 * new.cfg.bytes_per_item == 200 * 6
    via_old = _cos(x, new.from_bytes(moved, 200)).mean()
    enc = new.encode(x)
    direct = _cos(x, new.decode(enc.codes, enc.alphas)).mean()
    assert direct - 0.05 < via_old < direct  # a little worse than encoding the raw vector (0.893 vs 0.919)
    again = new.from_bytes(transcode(moved, 200, new, new), 200)  # a second pass moves it little
    assert _cos(again, new.from_bytes(moved, 200)).mean() > 0.98


@pytest.mark.parametrize("codewords", [64, 300])  # one byte per code, and two
def test_the_batch_record_check_equals_the_one_record_check(pool, codewords) -> None:
    """``valid_records`` (a batch's item codes in one pass) says what ``valid_record`` says of each record:
    good records, short and long ones, codes past the codebook, an empty one."""
    book = ResidualCodebook.fit(pool[:1000], CodebookConfig(dim=32, layers=3, codewords=codewords, kmeans_iters=2))
    good = [r.tobytes() for r in book.encode(pool[:20]).records()]
    width = book.cfg.code_dtype.itemsize
    past = bytearray(good[1])
    past[width * 2 : width * 3] = (codewords + 5).to_bytes(width, "little")  # the third layer's code
    records = [*good[:5], good[5][:-1], good[6] + b"\x00", bytes(past), b"", *good[7:]]
    want = [book.valid_record(r) for r in records]
    assert want.count(False) == 4 and book.valid_records(records) == want
    assert book.valid_records([]) == [] and book.valid_records([b"x"]) == [False]
