"""End-to-end runs of recipes/ner.py and recipes/qa.py on tiny presets and hand-written data."""

import importlib.util
import json
import os
import re
import time

import pytest

import klora

from tests.conftest import TASK_DATA

RECIPES = os.path.join(os.path.dirname(__file__), "..", "recipes")
NER_TRAIN, NER_VALID = f"{TASK_DATA}/ner_train.txt", f"{TASK_DATA}/ner_valid.txt"
QA_TRAIN, QA_VALID = f"{TASK_DATA}/squad_train.json", f"{TASK_DATA}/squad_valid.json"


def recipe(name):
    spec = importlib.util.spec_from_file_location(f"{name}_recipe", f"{RECIPES}/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ner_args(preset, out, *extra):
    # --max-length 8 cuts several sentences into chunks of words.
    return ["train", "--preset", preset, "--data", NER_TRAIN, "--validation-data", NER_VALID,
            "--epochs", "2", "--batch-size", "64", "--max-length", "8", "--rank", "2",
            "--output-dir", str(out), *extra]


def qa_args(preset, out, *extra):
    # --max-length 32 splits every context into several windows.
    return ["train", "--preset", preset, "--data", QA_TRAIN, "--validation-data", QA_VALID,
            "--epochs", "2", "--batch-size", "64", "--max-length", "32", "--doc-stride", "8",
            "--rank", "2", "--output-dir", str(out), *extra]


def check_outputs(out, monitor_keys):
    for name in ("history.json", "metrics.json", "curves.png", "checkpoints/last.npz"):
        assert (out / name).is_file(), name
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    history = json.loads((out / "history.json").read_text())
    for key in ("loss", "val_loss", *monitor_keys):
        assert len(history[key]) == 2, key
    return json.loads((out / "metrics.json").read_text())


def test_ner_trains_reports_entity_f1_and_predicts_spans(task_preset, tmp_path, capsys):
    ner = recipe("ner")
    assert ner.main(ner_args(task_preset, tmp_path)) == 0
    metrics = check_outputs(tmp_path, ("val_f1", "val_precision", "val_recall"))
    scores = metrics["validation"]
    assert 0 <= scores["f1"] <= 1 and metrics["validation_sentences"] == 4
    assert set(scores["per_type"]) <= {"PER", "LOC", "ORG", "MISC"}
    assert sum(s["support"] for s in scores["per_type"].values()) == 10   # every entity counted
    assert os.listdir(tmp_path / "adapter")
    out = capsys.readouterr().out
    assert re.search(r"epoch 2: val_precision [\d.]+, val_recall [\d.]+, val_f1 [\d.]+", out)
    text = "Maria Lopez flew to Zürich, then Oslo."
    assert ner.main(["predict", "--adapter", str(tmp_path / "adapter"), "--preset", task_preset,
                     text, "Tom"]) == 0
    lines = [json.loads(l) for l in capsys.readouterr().out.strip().splitlines()[-2:]]
    assert [l["text"] for l in lines] == [text, "Tom"]
    for entity in lines[0]["entities"]:
        assert text[entity["start"]:entity["end"]] == entity["text"]
        assert entity["type"] in ("PER", "LOC", "ORG", "MISC")
    # An adapter made by PEFT has no klora metadata: the flags supply it.
    from tests.sentiment_recipe_test import strip_klora_metadata

    strip_klora_metadata(tmp_path / "adapter")
    predict = ["predict", "--adapter", str(tmp_path / "adapter"), text]
    assert ner.main(predict) == 2
    assert "pass --preset, --tags, --max-length" in capsys.readouterr().err
    tags = json.loads((tmp_path / "metrics.json").read_text())["tags"]
    assert ner.main(predict + ["--preset", task_preset, "--tags", ",".join(tags),
                               "--max-length", "64"]) == 0


def test_resume_refuses_other_settings_and_corrupt_checkpoints(task_preset, tmp_path, capsys):
    if "distil" in task_preset:
        pytest.skip("resuming is model-independent: checked on the BERT preset only")
    ner = recipe("ner")
    args = ner_args(task_preset, tmp_path, "--patience", "5")
    args[args.index("--epochs") + 1] = "1"
    assert ner.main(args) == 0
    changed = list(args)
    changed[changed.index("--epochs") + 1] = "2"
    assert ner.main(changed + ["--learning-rate", "0.01"]) == 2
    error = capsys.readouterr().err
    assert "epochs: 1 -> 2" in error and "learning_rate: 0.001 -> 0.01" in error
    assert "--restart" in error
    assert ner.main(args + ["--patience", "6"]) == 0  # patience only decides when to stop
    assert "Resuming after epoch 1" in capsys.readouterr().out
    last = tmp_path / "checkpoints" / "last.npz"
    last.write_bytes(last.read_bytes()[:1000])  # a disk that filled up mid-write, say
    assert ner.main(args) == 2
    error = capsys.readouterr().err
    assert str(last) in error and "truncated or corrupt" in error and "--restart" in error
    assert ner.main(changed + ["--restart"]) == 0
    assert "Resuming" not in capsys.readouterr().out
    assert len(json.loads((tmp_path / "history.json").read_text())["val_f1"]) == 2


@pytest.mark.parametrize("content, message", [
    ("Anna B-PER\nsings\n", r"bad.txt:2: expected 'token ... TAG'"),
    ("Anna X B-PER\nsings O\n", r"bad.txt:2: 2 columns, but earlier lines have 3"),
    ("Anna B-ART\n", r"unknown tag\(s\) \['B-ART'\]"),
])
def test_ner_bad_validation_files(task_preset, tmp_path, capsys, content, message):
    bad = tmp_path / "bad.txt"
    bad.write_text(content, encoding="utf-8")
    args = ner_args(task_preset, tmp_path / "out")
    args[args.index("--validation-data") + 1] = str(bad)
    assert recipe("ner").main(args) == 2
    assert re.search(message, capsys.readouterr().err)


def test_qa_trains_reports_em_f1_and_answers(task_preset, tmp_path, capsys):
    qa = recipe("qa")
    assert qa.main(qa_args(task_preset, tmp_path)) == 0
    metrics = check_outputs(tmp_path, ("val_f1", "val_exact_match"))
    assert 0 <= metrics["validation"]["f1"] <= 100 and metrics["validation_questions"] == 3
    capsys.readouterr()
    context = "Café Müller opened in Zürich in 1875."
    assert qa.main(["predict", "--adapter", str(tmp_path / "adapter"), "--preset", task_preset,
                    "--question", "Where did it open?", "--context", context]) == 0
    answer = capsys.readouterr().out.strip().splitlines()[-1]
    assert answer in context and answer.strip()


@pytest.mark.parametrize("extra, message", [
    (["--doc-stride", "40"], "--doc-stride 40 is larger than"),
    (["--max-length", "100"], "exceeds the model's limit of 64"),
    (["--n-best", "0"], "--n-best must be >= 1"),
])
def test_qa_bad_arguments(task_preset, tmp_path, capsys, extra, message):
    assert recipe("qa").main(qa_args(task_preset, tmp_path, *extra)) == 2
    assert re.search(message, capsys.readouterr().err)


def test_qa_answer_not_at_its_start(task_preset, tmp_path, capsys):
    data = json.loads(open(QA_VALID, encoding="utf-8").read())
    data["data"][0]["paragraphs"][0]["qas"][0]["answers"][0]["answer_start"] += 1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data), encoding="utf-8")
    args = qa_args(task_preset, tmp_path / "out")
    args[args.index("--validation-data") + 1] = str(bad)
    assert recipe("qa").main(args) == 2
    assert re.search(r"bad.json: question 'q0': answer '40,000' does not occur at answer_start",
                     capsys.readouterr().err)


@pytest.mark.parametrize("name, data", [("ner", "conll2003"), ("qa", "squad")])
def test_tfds_names_offline_fail_fast(task_preset, tmp_path, capsys, monkeypatch, name, data):
    pytest.importorskip("tensorflow_datasets")
    from klora.data import tfds_text

    monkeypatch.setattr(tfds_text, "DOWNLOAD_HOST", ("127.0.0.1", 9))  # nothing listens there
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    args = (ner_args if name == "ner" else qa_args)(task_preset, tmp_path)
    args[args.index("--data") + 1] = data
    start = time.time()
    assert recipe(name).main(args) == 2
    assert time.time() - start < 30
    assert "no network" in capsys.readouterr().err


def test_ner_and_qa_evaluate_and_export(task_preset, tmp_path, capsys):
    for name, args, key in (("ner", ner_args, "f1"), ("qa", qa_args, "f1")):
        module = recipe(name)
        out = tmp_path / name
        assert module.main(args(task_preset, out)) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert module.main(["evaluate", "--adapter", str(out / "adapter"), "--output",
                            str(tmp_path / f"{name}.json")]) == 0
        scores = json.loads((tmp_path / f"{name}.json").read_text())
        assert scores[key] == metrics["validation"][key]
        assert module.main(["export", "--adapter", str(out / "adapter"),
                            "--output", str(tmp_path / f"{name}-hf")]) == 0
        assert (tmp_path / f"{name}-hf" / "config.json").is_file()
        assert module.main(["export", "--adapter", str(out / "adapter"), "--format",
                            "keras-hub", "--output", str(tmp_path / f"{name}-kh")]) == 2
        assert "keras-hub has no task" in capsys.readouterr().err
    predictions = json.loads((tmp_path / "qa_predictions.json").read_text())
    assert len(predictions) == 3 and all("answer" in p for p in predictions.values())
    assert "per_type" in json.loads((tmp_path / "ner.json").read_text())


def squad_v2_file(source, negatives, path):
    """`source` as SQuAD 2.0: every question flagged, and each article gets two questions
    of a different article of `negatives` as unanswerable ones (realistic negatives)."""
    data = json.loads(open(source, encoding="utf-8").read())
    others = json.loads(open(negatives, encoding="utf-8").read())["data"]
    for a, article in enumerate(data["data"]):
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                qa["is_impossible"] = False
        other = next(o for o in others[a + 1:] + others if o["title"] != article["title"])
        article["paragraphs"][0]["qas"] += [
            {"id": f"{qa['id']}-none-{a}", "question": qa["question"], "answers": [],
             "is_impossible": True} for qa in other["paragraphs"][0]["qas"][:2]]
    data["version"] = "v2.0"
    path.write_text(json.dumps(data), encoding="utf-8")
    return str(path)


def test_qa_squad_v2_tunes_and_saves_a_null_threshold(task_preset, tmp_path, capsys):
    qa = recipe("qa")
    train = squad_v2_file(QA_TRAIN, QA_TRAIN, tmp_path / "train.json")
    valid = squad_v2_file(QA_VALID, QA_TRAIN, tmp_path / "valid.json")
    out = tmp_path / "run"
    assert qa.main(["train", "--preset", task_preset, "--data", train, "--validation-data",
                    valid, "--epochs", "2", "--batch-size", "64", "--max-length", "32",
                    "--doc-stride", "8", "--rank", "2", "--output-dir", str(out)]) == 0
    scores = json.loads((out / "metrics.json").read_text())["validation"]
    assert scores["NoAns_total"] == 2 and scores["HasAns_total"] == 3 and scores["total"] == 5
    for key in ("exact_match", "f1", "HasAns_f1", "NoAns_f1", "HasAns_exact_match"):
        assert 0 <= scores[key] <= 100
    # The overall F1 is the HasAns / NoAns mix, and the tuned threshold beats its extremes.
    assert scores["f1"] == pytest.approx((3 * scores["HasAns_f1"] + 2 * scores["NoAns_f1"]) / 5)
    assert scores["f1"] >= 40.0  # "always no answer" scores 2 of 5
    metadata = klora.read_adapter_metadata(out / "adapter")
    assert metadata["squad_v2"] and metadata["null_threshold"] == scores["null_threshold"]
    assert qa.main(["evaluate", "--adapter", str(out / "adapter"), "--output",
                    str(tmp_path / "v2.json")]) == 0
    again = json.loads((tmp_path / "v2.json").read_text())
    assert again["f1"] == scores["f1"] and again["NoAns_f1"] == scores["NoAns_f1"]
    capsys.readouterr()
    assert qa.main(["predict", "--adapter", str(out / "adapter"), "--question", "Who?",
                    "--context", "Café Müller opened in Zürich in 1875."]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1]
