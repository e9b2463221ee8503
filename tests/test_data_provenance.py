"""What a run was trained on: recorded in run.json, checked on --resume (a change refused, naming
it, unless accepted, and the acceptance recorded), and the same text never on both sides of the
split (a file given twice, or an identical copy, is used once)."""

import json
import shutil

import pytest

from conftest import ROOT
from jaxllm import runio
from jaxllm.data.corpus import data_fingerprint, load_documents, train_val_split

CORPUS = ROOT / "tests" / "data" / "alls_well.txt"
TINY = ["--preset", "tiny", "--vocab-size", "300", "--context", "16", "--batch-size", "8", "--d-model", "16",
        "--heads", "2", "--sample-tokens", "4", "--eval-batch-size", "8", "--no-progress", "--schedule", "constant",
        "--warmup-steps", "0"]


def test_a_resume_on_edited_data_is_refused_naming_the_file_unless_accepted(tmp_path, load_script):
    text = (tmp_path / "corpus.txt").resolve()  # as recorded: the real path
    text.write_text(CORPUS.read_text()[:6000])
    out = tmp_path / "run"
    lm = load_script("lm")
    lm.main(["--text", str(text), "--out", str(out), "--steps", "2", *TINY])
    runio.unlock_run_dir(out)
    recorded = json.loads((out / "run.json").read_text())["data"]
    assert recorded["text"][0]["path"] == str(text) and recorded["text"][0]["size"] == text.stat().st_size

    text.write_text(CORPUS.read_text()[:6000].replace("Shakespeare", "Marlowe"))
    with pytest.raises(ValueError, match=f"the data changed since {out} was trained on it \\({text} changed"):
        lm.main(["--out", str(out), "--resume", "--steps", "4"])
    runio.unlock_run_dir(out)
    summary = lm.main(["--out", str(out), "--resume", "--steps", "4", "--accept-data-change"])
    assert summary["resumed_from"] == 2
    run = json.loads((out / "run.json").read_text())
    assert run["accepted_data_changes"][0]["before"] == recorded and run["data"] != recorded
    assert runio.describe_data(out).startswith(f"trained on {text} (")


def test_the_same_text_given_twice_is_used_once(tmp_path, capsys):
    a, b, c = tmp_path / "a.txt", tmp_path / "copy.txt", tmp_path / "c.txt"
    a.write_text("to be or not to be\n" * 50)
    shutil.copy(a, b)
    c.write_text("all the world's a stage\n" * 50)
    documents = load_documents([str(a), str(a), str(b), str(c)])
    assert [name for name, _ in documents] == [str(a), str(c)]
    err = capsys.readouterr().err
    assert f"note: text file {a} is given twice: it is used once" in err
    assert f"note: text file {b} has the same text as {a}: it is used once" in err
    train, val, report = train_val_split(documents, 0.5, seed=0)
    assert ("to be or not" in train) != ("to be or not" in val)  # one side only
    assert data_fingerprint([str(a), str(b)], seed=0, val_fraction=0.1)["text"] == \
        data_fingerprint([str(a)], seed=0, val_fraction=0.1)["text"]


def test_broken_run_files_name_themselves_and_what_to_do(tmp_path, load_script):
    text = tmp_path / "corpus.txt"
    text.write_text(CORPUS.read_text()[:6000])
    out = tmp_path / "run"
    lm = load_script("lm")
    lm.main(["--text", str(text), "--out", str(out), "--steps", "2", "--log-every", "1", *TINY])
    runio.unlock_run_dir(out)
    log = (out / "metrics.jsonl").read_text()
    (out / "metrics.jsonl").write_text(log[:len(log) - 20])  # the last row cut, as by a full disk
    with pytest.raises(ValueError, match=f"{out / 'metrics.jsonl'} line 3 is not a metrics row .*: restore the file"):
        lm.main(["--out", str(out), "--resume", "--steps", "4"])
    runio.unlock_run_dir(out)
    (out / "metrics.jsonl").write_text(log)
    (out / "summary.json").write_text('{"status": "finished", ')
    with pytest.raises(ValueError, match=f"{out / 'summary.json'} is not valid JSON .*: restore it, or delete it"):
        runio.update_json(out / "summary.json", {"x": 1})
    (out / "run.json").write_text("{")
    with pytest.raises(ValueError, match=f"{out / 'run.json'} is unreadable .*: restore it, or pass --overwrite"):
        lm.main(["--out", str(out), "--resume", "--steps", "4"])
    assert not (out / runio.PREVIOUS_RUN).exists() and (out / "checkpoints" / "2").exists()
