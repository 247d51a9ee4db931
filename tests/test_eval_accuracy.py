"""The accuracy harness: scoring helpers, and its plumbing end to end on the tiny model.

The tiny checkpoint has random weights, so its answers are meaningless; the end-to-end
test checks the CSV (rows, columns, counts) and makes the unpruned accuracy known by
building a second dataset whose answers are the unpruned run's own predictions.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
_spec = importlib.util.spec_from_file_location("_bench_eval_accuracy", BENCH / "eval_accuracy.py")
ev = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ev)

METHODS = ["script", "gsp", "uniform"]
BUDGETS = [128, 16]


def test_normalize():
    assert ev.normalize("  The RED car. ") == "red car"
    assert ev.normalize("A dog, an apple!") == "dog apple"
    assert ev.normalize("there") == "there"  # "the" only as a word


def test_choice_letter_and_scoring():
    choices = ["cat", "dog", "horse"]
    assert ev.choice_letter("B", choices) == "B"
    assert ev.choice_letter("(C) horse", choices) == "C"
    assert ev.choice_letter("The answer is B.", choices) == "B"
    assert ev.choice_letter("a dog", choices) == "B"  # the choice's text
    assert ev.choice_letter("D", choices) is None  # not an option
    assert ev.choice_letter("zebra", choices) is None
    mc = {"question": "q", "choices": choices, "answer": "B"}
    assert ev.is_correct("B", mc) and ev.is_correct("dog", mc)
    assert not ev.is_correct("A", mc) and not ev.is_correct("", mc)
    assert ev.is_correct("B.", {**mc, "answer": "dog"})  # answer given as text
    open_q = {"question": "q", "answer": ["red", "dark red"]}
    assert ev.is_correct("Red.", open_q) and ev.is_correct("the dark red", open_q)
    assert not ev.is_correct("red car", open_q)
    assert not ev.is_correct("the", {"question": "q", "answer": "a"})  # nothing left to match


def test_prompt():
    prompt = ev.build_prompt({"question": "which one?", "choices": ["x", "y"], "answer": "A"})
    assert prompt.startswith("USER: <image>\nwhich one?\nA. x\nB. y\n")
    assert prompt.endswith("ASSISTANT:")


def test_relative_accuracy():
    assert ev.relative_accuracy(0.5, 0.5) == 1.0
    assert ev.relative_accuracy(0.25, 0.5) == 0.5
    assert math.isnan(ev.relative_accuracy(0.0, 0.0))  # undefined, not 1 or inf
    assert math.isnan(ev.relative_accuracy(0.5, 0.0))
    assert math.isnan(ev.relative_accuracy(0.5, math.nan))


def test_summarize():
    records = [{"question": "q", "answer": a} for a in ("red", "two", "yes", "no")]
    settings = [ev.OFF, ("script", 64)]
    preds = {ev.OFF: ["red", "two", "no", "no"], ("script", 64): ["red", "one", "no", "no"]}
    off, on = ev.summarize(settings, preds, records)
    assert (off["correct"], off["accuracy"], off["relative_to_unpruned"]) == (3, 0.75, 1.0)
    assert (on["correct"], on["accuracy"]) == (2, 0.5)
    assert on["relative_to_unpruned"] == pytest.approx(2 / 3)
    assert on["agreement_with_unpruned"] == 0.75
    zero = ev.summarize(settings, {s: ["x"] * 4 for s in settings}, records)
    assert all(math.isnan(r["relative_to_unpruned"]) for r in zero)
    with pytest.raises(ValueError):
        ev.summarize(settings[::-1], preds, records)


def _dataset(tmp_path: Path, name: str, answers: list) -> Path:
    from vllm_script.testing import random_image

    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    questions = [
        ("which color is the car?", None),
        ("how many people are there?", None),
        ("is it day or night?", ["day", "night"]),
        ("where is the cat?", ["left", "right", "top"]),
        ("what is in the image?", None),
        ("is the dog near or far?", ["near", "far"]),
    ]
    lines = []
    for i, ((question, choices), answer) in enumerate(zip(questions, answers, strict=True)):
        random_image(100 + i).save(images / f"{i}.png")
        record = {"id": f"q{i}", "image": f"images/{i}.png", "question": question}
        if choices:
            record["choices"] = choices
        record["answer"] = answer
        lines.append(json.dumps(record))
    lines[1] = lines[1].replace('"images/1.png"', f'"{images / "1.png"}"')  # absolute path
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def llm(tiny_llava):
    from engine_utils import ENGINE_KWARGS
    from vllm import LLM

    engine = LLM(
        model=str(tiny_llava),
        hf_overrides={"script": {"method": "script", "budget": 64}},
        **ENGINE_KWARGS,
    )
    yield engine
    del engine


def _read(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.e2e
def test_harness_on_tiny_checkpoint(tiny_llava, llm, tmp_path):
    common = [
        "--model",
        str(tiny_llava),
        "--methods",
        ",".join(METHODS),
        "--budgets",
        ",".join(map(str, BUDGETS)),
        "--max-tokens",
        "3",
        "--batch-size",
        "4",
    ]
    # 1. answers from the tiny vocabulary; whatever the model says
    data = _dataset(tmp_path, "a.jsonl", ["red", "two", "B", "left", "a dog", "A"])
    out, preds = tmp_path / "a.csv", tmp_path / "a.preds.jsonl"
    ev.main([*common, "--data", str(data), "--out", str(out), "--predictions", str(preds)], llm=llm)
    rows = _read(out)
    assert list(rows[0]) == ev.CSV_COLUMNS
    expected = [("none", "0")] + [(m, str(b)) for m in METHODS for b in BUDGETS]
    assert [(r["method"], r["budget"]) for r in rows] == expected
    assert all(r["n"] == "6" for r in rows)
    for r in rows:
        assert 0 <= int(r["correct"]) <= 6
        assert float(r["accuracy"]) == pytest.approx(int(r["correct"]) / 6, abs=1e-4)
    assert float(rows[0]["agreement_with_unpruned"]) == 1.0
    answers = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(answers) == 6 * len(expected)

    # 2. the unpruned predictions become the answers of questions 0-2; 3-5 get answers
    #    nobody gives: unpruned accuracy is exactly 1/2 and its relative accuracy 1
    unpruned = [a["prediction"] for a in answers if a["method"] == "none"]
    assert [a["index"] for a in answers if a["method"] == "none"] == list(range(6))
    known = []
    for i, pred in enumerate(unpruned[:3]):
        if i == 2:  # multiple choice (day / night): the letter the prediction names, if any
            known.append(ev.choice_letter(pred, ["day", "night"]) or "zzz-never")
        else:  # open: the prediction itself, unless it normalises to nothing
            known.append(pred if ev.normalize(pred) else "zzz-never")
    data_b = _dataset(tmp_path, "b.jsonl", [*known, "zzz-never", "zzz-never", "zzz-never"])
    out_b = tmp_path / "b.csv"
    rows_b = ev.main([*common, "--data", str(data_b), "--out", str(out_b)], llm=llm)
    reachable = sum(k != "zzz-never" for k in known)
    assert rows_b[0]["correct"] == reachable
    if reachable:
        assert rows_b[0]["relative_to_unpruned"] == 1.0
        for row in rows_b[1:]:
            assert row["relative_to_unpruned"] == pytest.approx(row["correct"] / reachable)
    else:  # the model said nothing scoreable: relative accuracy is undefined everywhere
        assert all(math.isnan(r["relative_to_unpruned"]) for r in rows_b)
    assert _read(out_b)[0]["relative_to_unpruned"] in ("1.0000", "nan")
