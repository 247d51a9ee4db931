"""Shared by the generic adapter's end-to-end modules (test_e2e_gemma3.py, ...).

A module costs two engine starts: one engine with the plugin and a server-wide budget
(in the test process), and vanilla vLLM once in a separate process. All requests run
in a few combined batches (`run_case`); the tests read the results:

- parity: the same requests in both engines, one at a time (so the encoder batches the
  same items in both), every request unpruned (per-request `method: none`, or a budget
  above N): prompts, answers and logprobs equal exactly;
- pruned: each image alone at the server's budget and at a per-request override
  (another method and budget), and two images in one prompt; N per image is read from
  the vanilla prompt (the run of the image's embedding token), K = min(budget, N);
- the worker's recorded selections (method, N, K per image);
- a refused request next to a good one.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

from engine_utils import ENGINE_KWARGS, run_batch, run_in_fresh_engine, run_requests

SERVER = {"method": "script", "budget": 16}
OVERRIDE = {"method": "divprune", "budget": 40}
OFF = {"script": {"method": "none"}}
WIDE = {"script": {"budget": 1_000_000}}  # keeps every token, through the pruning path
QUESTIONS = ["what is in the image?", "how many people are there?"]


@dataclass(frozen=True)
class Case:
    """One architecture's end-to-end case.

    template:    engine_utils.TEMPLATES key.
    embed_token: the token whose run the image's embedding rows fill.
    sizes:       images as [seed, width, height] (different N where the model allows).
    short_name:  the name error messages use for the architecture.
    """

    template: str
    embed_token: str
    sizes: list
    short_name: str
    # no prefix caching: a prefix reused in one engine and recomputed in the other (the
    # per-request settings are part of the cache key) rounds differently, and the parity
    # check compares logprobs exactly
    engine: dict = field(
        default_factory=lambda: {
            **ENGINE_KWARGS,
            "max_model_len": 4096,
            "enable_prefix_caching": False,
        }
    )


def req(case: Case, images: list, kw: dict | None = None, question: str = QUESTIONS[0]) -> dict:
    r = {"template": case.template, "question": question, "images": images, "logprobs": 2}
    if kw is not None:
        r["mm_processor_kwargs"] = kw
    return r


def run_case(case: Case, model_dir) -> dict:
    """Start both engines, run every batch, return all results (see the module doc)."""
    os.environ["VLLM_SCRIPT_RECORD_SELECTIONS"] = "1"
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc with a function
    from vllm import LLM

    from vllm_script.pruning import recent_selections

    sizes = case.sizes
    pair = [sizes[0], sizes[-1]]
    plain = [req(case, [s], question=QUESTIONS[i % 2]) for i, s in enumerate(sizes)]
    plain += [req(case, pair, question=QUESTIONS[1]), req(case, [])]
    unpruned = [{**r, "mm_processor_kwargs": OFF if i % 2 else WIDE} for i, r in enumerate(plain)]
    pruned = (
        plain[: len(sizes)]
        + [{**r, "mm_processor_kwargs": {"script": OVERRIDE}} for r in plain[: len(sizes)]]
        + [plain[len(sizes)]]
    )
    vanilla = run_in_fresh_engine(model_dir, plain, plugins=False, engine_kwargs=case.engine)
    llm = LLM(model=str(model_dir), hf_overrides={"script": SERVER}, **case.engine)
    try:
        tokenizer = llm.get_tokenizer()
        out = {
            "embed_id": tokenizer.convert_tokens_to_ids(case.embed_token),
            "vanilla": vanilla,
            "unpruned": run_requests(llm, unpruned),
        }
        before = len(llm.collective_rpc(recent_selections)[0])
        out["pruned"] = run_batch(llm, pruned)
        out["recorded"] = llm.collective_rpc(recent_selections)[0][before:]
        refused = req(case, [sizes[0]], {"script": {"method": "trim"}})
        out["refused"] = run_requests(llm, [refused, req(case, [sizes[0]])])
    finally:
        del llm
    return out


def runs_of(prompt: list[int], token: int) -> list[int]:
    """Lengths of the maximal runs of `token` in `prompt`, in order."""
    lengths, current = [], 0
    for t in prompt:
        if t == token:
            current += 1
        elif current:
            lengths.append(current)
            current = 0
    return lengths + ([current] if current else [])


def without(prompt: list[int], token: int) -> list[int]:
    return [t for t in prompt if t != token]


# ---- the checks every module runs on its `run_case` results ----


def check_unpruned_equal_vanilla(res: dict) -> None:
    assert res["unpruned"] == res["vanilla"]
    images = [r["logprobs"] for r in res["vanilla"][:-1]]
    # the checkpoint's answers depend on the image: parity is not vacuous
    assert len({repr(lp) for lp in images}) == len(images)


def check_same_but_image_runs(van: dict, on: dict, tok: int, budget: int) -> None:
    """`on` is `van` with each image's run of N embedding tokens cut to min(budget, N)."""
    n = runs_of(van["prompt"], tok)
    assert n, "no image in the vanilla prompt"
    assert runs_of(on["prompt"], tok) == [min(budget, x) for x in n], (n, budget)
    assert without(on["prompt"], tok) == without(van["prompt"], tok)  # text kept
    assert on["prompt_len"] == van["prompt_len"] - sum(x - min(budget, x) for x in n)


def check_each_image_keeps_min_budget_n(res: dict, case: Case) -> None:
    count = len(case.sizes)
    for i, van in enumerate(res["vanilla"][:count]):
        check_same_but_image_runs(van, res["pruned"][i], res["embed_id"], SERVER["budget"])
        check_same_but_image_runs(
            van, res["pruned"][count + i], res["embed_id"], OVERRIDE["budget"]
        )


def check_two_images(res: dict) -> None:
    van, on = res["vanilla"][-2], res["pruned"][-1]
    assert len(runs_of(van["prompt"], res["embed_id"])) == 2
    check_same_but_image_runs(van, on, res["embed_id"], SERVER["budget"])


def check_recorded_selections(res: dict, case: Case) -> None:
    tok = res["embed_id"]
    ns = [runs_of(r["prompt"], tok)[0] for r in res["vanilla"][: len(case.sizes)]]
    pair = runs_of(res["vanilla"][-2]["prompt"], tok)
    expected = Counter()
    for n in ns + pair:
        if SERVER["budget"] < n:
            expected[(SERVER["method"], n, SERVER["budget"])] += 1
    for n in ns:
        if OVERRIDE["budget"] < n:
            expected[(OVERRIDE["method"], n, OVERRIDE["budget"])] += 1
    got = Counter((r["method"], r["num_tokens"], r["kept"]) for r in res["recorded"])
    assert got == expected
    for r in res["recorded"]:
        assert len(set(r["keep"])) == r["kept"] and all(0 <= i < r["num_tokens"] for i in r["keep"])


def check_refused_request(res: dict, case: Case) -> None:
    bad, good = res["refused"]
    assert "'script.method': 'trim'" in bad["error"], bad
    assert f"{case.short_name} supports" in bad["error"], bad
    assert "error" not in good
