"""Accuracy harness: a local VQA-style dataset at several budgets and methods, vs unpruned.

    .venv/bin/python benchmarks/eval_accuracy.py --model llava-hf/llava-1.5-7b-hf \\
        --data vqa.jsonl --methods script,gsp,qcsp --budgets 192,128,64 \\
        --out benchmarks/results/accuracy.csv [--predictions preds.jsonl] [--limit 500]

Dataset format (JSONL, one record per line; paths relative to the file's directory or
absolute):

    {"image": "images/0001.png", "question": "What color is the car?", "answer": "red"}
    {"image": "/data/img/17.jpg", "question": "Which animal is shown?",
     "choices": ["cat", "dog", "horse"], "answer": "B"}

- `answer`: a string, or a list of acceptable strings (any one counts).
- `choices` (optional): multiple choice. The prompt lists them as "A. ...", "B. ..."
  and asks for the letter; the answer may be the letter or the choice's text. The
  prediction counts if its letter (a standalone A, B, ... at the start, or "(B)",
  "B." anywhere) or its normalised text equals the answer's.
- Open questions: exact match after normalisation (lowercase, punctuation and the
  articles a/an/the removed, whitespace collapsed); an answer that normalises to
  nothing never matches.
- `id` (optional): kept in the predictions file.

One engine serves every setting: each request carries `mm_processor_kwargs={"script":
{"method": m, "budget": b}}` (or `{"method": "none"}` for the unpruned reference), so all
settings see the same weights, prompts and greedy decoding. Prefix caching is left at
vLLM's default: the selection depends on the question and settings, both of which are in
the image's cache key.

Output CSV, one row per setting (the unpruned one first, method "none"):
method, budget, n, correct, accuracy, relative_to_unpruned, agreement_with_unpruned.

- accuracy = correct / n.
- relative_to_unpruned = accuracy / accuracy of the unpruned row; 1.0 for the unpruned
  row itself whenever that is defined; NaN (written "nan") for every row when the
  unpruned accuracy is 0 (the ratio is undefined; `agreement_with_unpruned` still says
  something).
- agreement_with_unpruned: share of questions whose normalised answer equals the
  unpruned run's (1.0 for the unpruned row).

lmms-eval instead of a local file (text only; nothing here installs it): start one
OpenAI-compatible server per setting, with the setting server-wide, and point lmms-eval
at it, e.g.

    .venv/bin/vllm-script serve llava-hf/llava-1.5-7b-hf --port 8000 \\
        --hf-overrides '{"script": {"method": "script", "budget": 64}}'
    OPENAI_API_KEY=EMPTY python -m lmms_eval --model openai_compatible \\
        --model_args model_version=llava-hf/llava-1.5-7b-hf,base_url=http://localhost:8000/v1 \\
        --tasks vqav2_val_lite,gqa --batch_size 1 --output_path logs/script-64

and once more without `--hf-overrides` (the unpruned reference); relative accuracy =
the pruned score / the unpruned one. (lmms-eval cannot send per-request
`mm_processor_kwargs`, so per-request settings through the server would need
`--trust-request-mm-kwargs` and a client that sends them; see README.md. The
`--model_args` names differ between lmms-eval versions: check `--model openai_compatible`
in the version you install.)
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import string
import sys
import tempfile
from pathlib import Path

DEFAULT_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"
CHOICE_SUFFIX = "Answer with the option's letter from the given choices directly."
CSV_COLUMNS = [
    "method",
    "budget",
    "n",
    "correct",
    "accuracy",
    "relative_to_unpruned",
    "agreement_with_unpruned",
]
OFF = ("none", 0)

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


# ---------------------------------------------------------------- pure helpers (tested)


def normalize(text: str) -> str:
    """Lowercase, punctuation -> spaces, articles dropped, whitespace collapsed."""
    text = str(text).lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def letters(num: int) -> str:
    return string.ascii_uppercase[:num]


def choice_letter(prediction: str, choices: list[str]) -> str | None:
    """The option a prediction names: a leading letter, "(B)" / "B." / "B)" anywhere, or
    the normalised text of one choice; None if none does."""
    valid = letters(len(choices))
    text = prediction.strip()
    lead = re.match(r"^\(?([A-Z])(?:[\s.):,]|$)", text)
    if lead and lead.group(1) in valid:
        return lead.group(1)
    for match in re.finditer(r"\(([A-Z])\)|\b([A-Z])[.)]", text):
        letter = match.group(1) or match.group(2)
        if letter in valid:
            return letter
    norm = normalize(text)
    for letter, choice in zip(valid, choices, strict=False):
        if norm and norm == normalize(choice):
            return letter
    return None


def is_correct(prediction: str, record: dict) -> bool:
    answers = record["answer"] if isinstance(record["answer"], list) else [record["answer"]]
    choices = record.get("choices")
    if choices:
        got = choice_letter(prediction, choices)
        if got is None:
            return False
        wanted = set()
        for answer in answers:
            answer = str(answer).strip()
            if len(answer) == 1 and answer.upper() in letters(len(choices)):
                wanted.add(answer.upper())
            else:
                letter = choice_letter(answer, choices)
                if letter is not None:
                    wanted.add(letter)
        return got in wanted
    norm = normalize(prediction)
    return bool(norm) and any(norm == normalize(answer) for answer in answers)


def build_prompt(record: dict, template: str = DEFAULT_TEMPLATE) -> str:
    question = str(record["question"]).strip()
    choices = record.get("choices")
    if choices:
        labels = letters(len(choices))
        options = "\n".join(f"{k}. {c}" for k, c in zip(labels, choices, strict=True))
        question = f"{question}\n{options}\n{CHOICE_SUFFIX}"
    return template.format(question=question)


def relative_accuracy(accuracy: float, unpruned_accuracy: float) -> float:
    """accuracy / unpruned accuracy; NaN when the unpruned accuracy is 0 (undefined)."""
    if not unpruned_accuracy > 0:  # 0 or NaN
        return math.nan
    return accuracy / unpruned_accuracy


def summarize(settings: list[tuple[str, int]], predictions: dict, records: list[dict]) -> list:
    """CSV rows; `predictions[setting]` is a list of answers in record order, settings[0]
    the unpruned one."""
    if settings[0] != OFF:
        raise ValueError("the first setting must be the unpruned one ('none', 0)")
    n = len(records)
    reference = [normalize(p) for p in predictions[OFF]]
    rows = []
    for setting in settings:
        preds = predictions[setting]
        correct = sum(is_correct(p, r) for p, r in zip(preds, records, strict=True))
        agree = sum(normalize(p) == ref for p, ref in zip(preds, reference, strict=True))
        rows.append(
            {
                "method": setting[0],
                "budget": setting[1],
                "n": n,
                "correct": correct,
                "accuracy": correct / n if n else math.nan,
                "agreement_with_unpruned": agree / n if n else math.nan,
            }
        )
    for row in rows:
        row["relative_to_unpruned"] = relative_accuracy(row["accuracy"], rows[0]["accuracy"])
    return rows


def load_dataset(path: Path, limit: int | None = None) -> list[dict]:
    """JSONL records with `image` resolved to an absolute path; checks required keys."""
    records = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            missing = {"image", "question", "answer"} - set(record)
            if missing:
                raise ValueError(f"{path}:{lineno}: missing {sorted(missing)}")
            image = Path(record["image"])
            record["image"] = str(image if image.is_absolute() else path.parent / image)
            records.append(record)
            if limit is not None and len(records) >= limit:
                break
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: (f"{row[k]:.4f}" if isinstance(row[k], float) else row[k]) for k in CSV_COLUMNS}
            )


# ----------------------------------------------------------------------- the harness


def run_setting(llm, records, setting, *, template, max_tokens, batch_size) -> list[str]:
    """Greedy answers for every record under one setting (batches of `batch_size`)."""
    from PIL import Image
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    method, budget = setting
    script = {"method": "none"} if method == "none" else {"method": method, "budget": budget}
    answers = []
    for start in range(0, len(records), batch_size):
        prompts = []
        for record in records[start : start + batch_size]:
            with Image.open(record["image"]) as img:
                image = img.convert("RGB")
            prompts.append(
                {
                    "prompt": build_prompt(record, template),
                    "multi_modal_data": {"image": image},
                    "mm_processor_kwargs": {"script": script},
                }
            )
        outputs = llm.generate(prompts, params, use_tqdm=False)
        answers.extend(out.outputs[0].text.strip() for out in outputs)
    return answers


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        required=True,
        help="a LLaVA-1.5 checkpoint, or a model preset name (tiny, small, bench: "
        "vllm_script.testing.MODEL_PRESETS) for a built-in random one (plumbing checks)",
    )
    parser.add_argument("--data", required=True, help="JSONL dataset (see above)")
    parser.add_argument("--methods", default="script,gsp,qcsp", help="comma-separated")
    parser.add_argument("--budgets", default="192,128,64", help="comma-separated")
    parser.add_argument("--out", required=True, help="CSV path")
    parser.add_argument("--predictions", default=None, help="also write answers (JSONL)")
    parser.add_argument("--limit", type=int, default=None, help="first N records only")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32, help="requests per generate")
    parser.add_argument("--template", default=DEFAULT_TEMPLATE, help="with {question}")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument(
        "--engine-kwargs", default="{}", help="JSON: more LLM(...) arguments, e.g. dtype"
    )
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
    if "{question}" not in args.template or "<image>" not in args.template:
        parser.error("--template needs {question} and <image>")
    args.model = resolve_model(args.model)
    return args


def resolve_model(name: str) -> str:
    """A checkpoint path or hub id as given; a preset name (and no such directory) ->
    the built-in random LLaVA-1.5 checkpoint of that size, written once."""
    from vllm_script.testing import MODEL_PRESETS, model_preset, write_tiny_llava

    if name not in MODEL_PRESETS or Path(name).exists():
        return name
    path = Path(tempfile.gettempdir()) / f"vllm-script-{name}-llava"
    return str(write_tiny_llava(path, **model_preset(name)))


def main(argv: list[str] | None = None, llm=None) -> list[dict]:
    """Run the harness; `llm` reuses an engine already built on `--model` (tests)."""
    args = parse_args(argv)
    records = load_dataset(Path(args.data), args.limit)
    if llm is None:
        from vllm import LLM

        llm = LLM(
            model=args.model,
            max_model_len=args.max_model_len,
            hf_overrides={"script": {"method": "script", "budget": max(args.budgets)}},
            limit_mm_per_prompt={"image": 1},
            seed=0,
            **json.loads(args.engine_kwargs),
        )
    settings = [OFF] + [(m, b) for m in args.methods for b in args.budgets]
    predictions = {}
    try:
        from tqdm import tqdm
    except ImportError:  # progress only

        def tqdm(x, **_):
            return x

    for setting in tqdm(settings, desc="settings", unit="setting"):
        predictions[setting] = run_setting(
            llm,
            records,
            setting,
            template=args.template,
            max_tokens=args.max_tokens,
            batch_size=args.batch_size,
        )
    rows = summarize(settings, predictions, records)
    write_csv(rows, Path(args.out))
    if args.predictions:
        with open(args.predictions, "w") as f:
            for setting in settings:
                for i, (record, answer) in enumerate(
                    zip(records, predictions[setting], strict=True)
                ):
                    f.write(
                        json.dumps(
                            {
                                "method": setting[0],
                                "budget": setting[1],
                                "index": i,
                                "id": record.get("id", i),
                                "prediction": answer,
                                "correct": is_correct(answer, record),
                            }
                        )
                        + "\n"
                    )
    print(f"{'method':>10} {'budget':>6} {'n':>5} {'accuracy':>9} {'relative':>9} {'agree':>6}")
    for r in rows:
        print(
            f"{r['method']:>10} {r['budget']:>6} {r['n']:>5} {r['accuracy']:>9.3f} "
            f"{r['relative_to_unpruned']:>9.3f} {r['agreement_with_unpruned']:>6.3f}"
        )
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
