"""Loaders, balancing, splitting and encoding of labelled texts; the VADER fetcher's extraction."""

import io
import os
import tarfile

import numpy as np
import pytest

from jaxllm.data import classification as cdata
from jaxllm.data import fetch_vader
from jaxllm.data.tabular import DataUnavailable
from jaxllm.data.tokenizer import train_bpe


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    return path


@pytest.fixture(scope="module")
def encoding():
    return train_bpe("the film was good and the plot was bad " * 20, 300)


# --------------------------------------------------------------------------- SMS format


def test_load_sms_reads_labels_and_texts(tmp_path):
    path = write(tmp_path, "sms.txt", "ham\tsee you at 5\nspam\tWIN a prize\tnow\n\nham\tok\n")
    data = cdata.load_sms(path)
    assert data.texts == ("see you at 5", "WIN a prize\tnow", "ok")  # only the first tab separates
    assert data.labels.tolist() == [0, 1, 0]
    assert data.label_names == ("ham", "spam")
    assert data.counts() == {"ham": 2, "spam": 1}


def test_load_sms_custom_labels(tmp_path):
    path = write(tmp_path, "t.txt", "b\tx\na\ty\nc\tz\n")
    data = cdata.load_sms(path, labels=["a", "b", "c"])
    assert data.labels.tolist() == [1, 0, 2]


def test_load_sms_unknown_label_names_the_line(tmp_path):
    path = write(tmp_path, "sms.txt", "ham\tfine\n\nmaybe\tnot sure\n")
    with pytest.raises(ValueError, match=r"line 3 has the unknown label 'maybe'.*\['ham', 'spam'\]"):
        cdata.load_sms(path)


def test_load_sms_line_without_tab_and_empty_text(tmp_path):
    with pytest.raises(ValueError, match="line 2 has no tab"):
        cdata.load_sms(write(tmp_path, "a.txt", "ham\thi\nspam no tab here\n"))
    with pytest.raises(ValueError, match="line 1 has an empty text"):
        cdata.load_sms(write(tmp_path, "b.txt", "ham\t   \n"))


def test_empty_dataset_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no examples: the dataset is empty"):
        cdata.load_sms(write(tmp_path, "empty.txt", "\n\n"))
    with pytest.raises(ValueError, match="no examples: the dataset is empty"):
        cdata.load_vader(write(tmp_path, "zeros.txt", "1\t0.0\tmeh\n"))  # only a zero rating: dropped


def test_missing_file_says_how_to_get_it(tmp_path):
    with pytest.raises(DataUnavailable, match="python -m jaxllm.data.fetch_vader"):
        cdata.load_vader(tmp_path / "nope.txt")
    with pytest.raises(DataUnavailable, match="no data file"):
        cdata.load_sms(tmp_path / "nope.txt")


# --------------------------------------------------------------------------- VADER format


def test_load_vader_signs_and_zero_dropped(tmp_path):
    text = "1\t2.26666666667\tGreat fun.\r\n2\t-0.6\tToo tepid\r\n3\t0.0\tA film.\r\n4\t1e-3\tbarely good\r\n"
    data = cdata.load_vader(write(tmp_path, "v.txt", text))
    assert data.texts == ("Great fun.", "Too tepid", "barely good")  # CRLF stripped, zero dropped
    assert data.labels.tolist() == [1, 0, 1]
    assert data.label_names == ("negative", "positive")


def test_load_vader_bad_lines(tmp_path):
    with pytest.raises(ValueError, match="line 2: expected id<TAB>rating<TAB>text, got 2 field"):
        cdata.load_vader(write(tmp_path, "a.txt", "1\t1.0\tok\n2\tbroken\n"))
    with pytest.raises(ValueError, match="line 1: the rating 'high' is not a number"):
        cdata.load_vader(write(tmp_path, "b.txt", "1\thigh\tok\n"))


def test_load_dispatch(tmp_path):
    path = write(tmp_path, "v.txt", "1\t1.0\tok\n")
    assert cdata.load(path, "vader").labels.tolist() == [1]
    with pytest.raises(ValueError, match="format must be one of"):
        cdata.load(path, "csv")
    with pytest.raises(ValueError, match="--labels applies to the sms format only"):
        cdata.load(path, "vader", ["a", "b"])


# --------------------------------------------------------------------------- balance / split


def labelled(counts):
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)]).astype(np.int32)
    return cdata.LabelledTexts(tuple(f"t{i}" for i in range(len(labels))), labels,
                               tuple(f"c{i}" for i in range(len(counts))))


def test_balance_undersamples_to_smallest_class():
    data = labelled([30, 12, 20])
    out = cdata.balance(data, seed=0)
    assert out.counts() == {"c0": 12, "c1": 12, "c2": 12}
    assert set(out.texts) >= {f"t{i}" for i in range(30, 42)}  # every row of the smallest class kept
    assert len(set(out.texts)) == 36  # no duplicates
    assert cdata.balance(data, seed=0).texts == out.texts
    assert cdata.balance(data, seed=1).texts != out.texts
    with pytest.raises(ValueError, match="some class has no examples"):
        cdata.balance(labelled([3, 0]), seed=0)


def test_split_sizes_partition_and_determinism():
    data = labelled([50, 50])  # 100 rows -> 70 / 10 / 20
    train, val, test = cdata.split(data, seed=3)
    assert (len(train), len(val), len(test)) == (70, 10, 20)
    assert sorted(train.texts + val.texts + test.texts) == sorted(data.texts)
    again = cdata.split(data, seed=3)
    assert [p.texts for p in again] == [p.texts for p in (train, val, test)]
    assert cdata.split(data, seed=4)[0].texts != train.texts
    # labels travel with their texts
    for part in (train, val, test):
        assert all(int(t[1:]) // 50 == y for t, y in zip(part.texts, part.labels))
    # the book's rounding: int(n * 0.7), int(n * 0.1), the rest
    assert tuple(map(len, cdata.split(labelled([7, 6]), seed=0))) == (9, 1, 3)
    with pytest.raises(ValueError, match="too few to split"):
        cdata.split(labelled([3, 3]), seed=0)


# --------------------------------------------------------------------------- encoding


def test_encode_right_pads_with_eot_and_records_lengths(encoding):
    texts = ["the film was good", "bad"]
    enc = cdata.encode_texts(encoding, texts, 12, labels=[1, 0])
    ids = [encoding.encode(t) for t in texts]
    assert enc.tokens.shape == (2, 12) and enc.tokens.dtype == np.int32
    assert enc.lengths.tolist() == [len(ids[0]), len(ids[1])]
    for row, seq in enumerate(ids):
        assert enc.tokens[row, :len(seq)].tolist() == seq
        assert (enc.tokens[row, len(seq):] == encoding.eot_token).all()
    assert enc.labels.tolist() == [1, 0]
    assert enc.truncated == 0


def test_encode_truncates_keeping_the_start_and_counts(encoding):
    long_text = "the film was good and the plot was bad and the film was good"
    ids = encoding.encode(long_text)
    assert len(ids) > 5
    enc = cdata.encode_texts(encoding, [long_text, "bad"], 5)
    assert enc.tokens[0].tolist() == ids[:5]
    assert enc.lengths.tolist() == [5, len(encoding.encode("bad"))]
    assert enc.truncated == 1


def test_encode_bad_input(encoding):
    with pytest.raises(ValueError, match="text 1 is empty"):
        cdata.encode_texts(encoding, ["ok", ""], 8)
    with pytest.raises(ValueError, match="the dataset is empty"):
        cdata.encode_texts(encoding, [], 8)
    with pytest.raises(ValueError, match="max_length must be >= 1"):
        cdata.encode_texts(encoding, ["ok"], 0)


def test_eot_written_in_a_text_is_not_the_pad_id(encoding):
    enc = cdata.encode_texts(encoding, ["<|endoftext|>"], 20)
    assert encoding.eot_token not in enc.tokens[0, :enc.lengths[0]].tolist()


# --------------------------------------------------------------------------- fetch_vader


def fake_sdist(path, snippets: bytes):
    """A source archive with the real layout: the snippets inside a nested tar.gz."""
    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as tar:
        add(tar, fetch_vader.SNIPPETS_MEMBER, snippets)
    with tarfile.open(path, "w:gz") as tar:
        add(tar, fetch_vader.NESTED_ARCHIVE, inner.getvalue())
        add(tar, fetch_vader.LICENSE_MEMBER, b"MIT")
    return path


def test_fetch_extracts_the_nested_file_and_checks_its_hash(tmp_path, monkeypatch):
    snippets = b"1\t1.5\tgood\r\n2\t-1.0\tbad\r\n"
    sdist = fake_sdist(tmp_path / "sdist.tar.gz", snippets)
    with pytest.raises(fetch_vader.FetchError, match="has sha256"):  # not the real file
        fetch_vader.fetch(str(tmp_path / "out"), archive=str(sdist))
    monkeypatch.setattr(fetch_vader, "SNIPPETS_SHA256", fetch_vader.sha256(snippets))
    dest = tmp_path / "out"
    path = fetch_vader.fetch(str(dest), archive=str(sdist))
    assert open(path, "rb").read() == snippets
    assert (dest / "LICENSE.txt").read_bytes() == b"MIT"
    assert cdata.load_vader(path).labels.tolist() == [1, 0]
    # idempotent: a verified file is left alone, no archive needed
    assert fetch_vader.fetch(str(dest), archive=str(tmp_path / "missing.tar.gz")) == path


def test_fetch_reports_a_bad_archive(tmp_path):
    bad = write(tmp_path, "bad.tar.gz", "not an archive")
    with pytest.raises(fetch_vader.FetchError, match="not a readable vaderSentiment==3.3.2 source archive"):
        fetch_vader.fetch(str(tmp_path / "out"), archive=str(bad))
    empty = tmp_path / "empty.tar.gz"
    with tarfile.open(empty, "w:gz"):
        pass
    with pytest.raises(fetch_vader.FetchError, match="has no file .*hutto_ICWSM_2014.tar.gz"):
        fetch_vader.fetch(str(tmp_path / "out"), archive=str(empty))


def test_fetch_explains_a_failed_download(tmp_path, monkeypatch, capsys):
    # pip that cannot reach PyPI: stand in a command that fails the same way (exit 1, a message)
    failing = ["python", "-c", "import sys; print('No matching distribution found', file=sys.stderr); sys.exit(1)"]
    monkeypatch.setattr(fetch_vader, "pip_download_command", lambda directory: [os.sys.executable, *failing[1:]])
    assert fetch_vader.main(["--dest", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "could not download the vaderSentiment==3.3.2 source archive from PyPI" in err
    assert "No matching distribution found" in err and "--archive" in err
    assert not (tmp_path / "out").exists()


REAL_VADER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), cdata.VADER_DEFAULT)


@pytest.mark.skipif(not os.path.isfile(REAL_VADER), reason="run `python -m jaxllm.data.fetch_vader` first")
def test_the_real_vader_file():
    data = cdata.load_vader(REAL_VADER)  # 10,605 lines: 5,242 positive, 5,326 negative, 37 zero (dropped)
    assert data.counts() == {"negative": 5326, "positive": 5242}
    parts = cdata.split(cdata.balance(data, 0), 0)
    assert [len(p) for p in parts] == [7338, 1048, 2098]  # 10,484 balanced rows cut 70/10/20
