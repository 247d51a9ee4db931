"""`vllm_script.ops.dpp_greedy_map` against a brute-force greedy over log det."""

from __future__ import annotations

import pytest
import torch

from vllm_script import ops
from vllm_script.reference import dpp as rdpp

# the CPU paths of the twin, each checked against the brute force on its own
PATHS = {
    "compiled": rdpp.dpp_greedy_map_compiled,
    "lazy": rdpp.dpp_greedy_map_lazy,
    "materialized": rdpp.dpp_greedy_map_materialized,
}


def brute_force_greedy(features, quality, k, candidates):
    """One image: each step adds the eligible token maximising slogdet(L_Y+i); fp64."""
    f_hat = torch.nn.functional.normalize(features.double(), dim=-1)
    q = quality.double()
    kernel = q[:, None] * q[None, :] * (f_hat @ f_hat.T)
    chosen: list[int] = []
    for _ in range(k):
        best, best_val = None, None
        for i in range(features.shape[0]):
            if i in chosen or not candidates[i]:
                continue
            idx = chosen + [i]
            sign, logdet = torch.linalg.slogdet(kernel[idx][:, idx])
            val = logdet.item() if sign > 0 else float("-inf")
            if best_val is None or val > best_val + 1e-9:
                best, best_val = i, val
        chosen.append(best)
    return chosen


CASES = [(1, 5, 8, 1), (1, 7, 5, 3), (3, 20, 16, 10), (2, 33, 40, 20), (1, 63, 64, 7)]


@pytest.mark.parametrize("path", ["ops", *PATHS])
@pytest.mark.parametrize("with_candidates", [False, True], ids=["all", "candidates"])
@pytest.mark.parametrize(
    ("b", "n", "d", "k"), CASES, ids=[f"B{b}-N{n}-D{d}-k{k}" for b, n, d, k in CASES]
)
def test_matches_brute_force_logdet_greedy(b, n, d, k, with_candidates, path):
    gen = torch.Generator().manual_seed(n * 31 + d)
    features = torch.randn(b, n, d, generator=gen)
    relevance = torch.rand(b, n, generator=gen) + 0.1
    candidates = None
    if with_candidates:
        candidates = torch.rand(b, n, generator=gen) > 0.3
        candidates[:, :k] = True  # at least k eligible
    if path == "ops":
        picks = ops.dpp_greedy_map(features, relevance, k, candidates=candidates, backend="torch")
    else:
        picks = PATHS[path](features, relevance, k, candidates=candidates)
    assert picks.shape == (b, k) and picks.dtype == torch.long
    for i in range(b):
        mask = candidates[i] if candidates is not None else torch.ones(n, dtype=torch.bool)
        assert picks[i].tolist() == brute_force_greedy(features[i], relevance[i], k, mask)


def test_relevance_none_means_all_ones():
    features = torch.randn(2, 30, 12)
    a = ops.dpp_greedy_map(features, None, 9)
    b = ops.dpp_greedy_map(features, torch.ones(2, 30), 9)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_low_precision_features_accepted(dtype):
    features = torch.randn(1, 40, 32).to(dtype)
    picks = ops.dpp_greedy_map(features, None, 10)
    assert picks.unique().numel() == 10


def test_rank_deficient_returns_k_distinct_and_fills_by_relevance():
    # D = 3 < k: after 3 picks no gain is left; the rest come by descending relevance
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(1, 12, 3, generator=gen)
    relevance = torch.linspace(0.1, 1.2, 12).unsqueeze(0)
    picks = ops.dpp_greedy_map(features, relevance, 12)
    assert sorted(picks[0].tolist()) == list(range(12))
    tail = picks[0, 3:].tolist()
    assert tail == sorted(tail, key=lambda i: -relevance[0, i].item())


def test_duplicates_are_picked_last_and_never_nan():
    base = torch.randn(1, 4, 16)
    features = base.repeat(1, 3, 1)  # tokens 0-3 repeated at 4-7 and 8-11
    picks = ops.dpp_greedy_map(features, None, 12)
    assert sorted(picks[0].tolist()) == list(range(12))
    assert set(picks[0, :4].tolist()) == {0, 1, 2, 3}  # originals first (ties: lowest)
    assert picks[0, 4:].tolist() == list(range(4, 12))  # equal relevance: lowest index first


def test_zero_features_and_zero_relevance_do_not_produce_nan():
    features = torch.zeros(1, 6, 4)
    features[0, 0] = 1.0
    picks = ops.dpp_greedy_map(features, torch.tensor([[1.0, 0, 0, 0, 0, 0]]), 6)
    assert picks[0, 0].item() == 0
    assert sorted(picks[0].tolist()) == list(range(6))


def test_candidates_are_respected():
    features = torch.randn(2, 25, 8)
    candidates = torch.zeros(2, 25, dtype=torch.bool)
    candidates[0, ::3] = True
    candidates[1, 1::2] = True
    picks = ops.dpp_greedy_map(features, None, 9, candidates=candidates)
    for b in range(2):
        assert candidates[b, picks[b]].all()
        assert picks[b].unique().numel() == 9


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, r"k=0 must be in \[1, 10\]"),
        ({"k": 11}, r"k=11 must be in \[1, 10\]"),
        (
            {"k": 4, "candidates": torch.tensor([[True] * 3 + [False] * 7])},
            r"k=4 must be in \[1, 3\]",
        ),
        ({"k": 2, "relevance": -torch.ones(1, 10)}, "non-negative"),
        ({"k": 2, "relevance": torch.ones(1, 9)}, r"relevance must have shape \[B, N\]"),
        ({"k": 2, "candidates": torch.ones(1, 10)}, "candidates must be a bool tensor"),
        ({"k": 2, "backend": "cuda"}, "backend='cuda' is not one of"),
    ],
    ids=[
        "k=0",
        "k>N",
        "k>eligible",
        "negative-relevance",
        "relevance-shape",
        "candidates-dtype",
        "backend",
    ],
)
def test_bad_input_names_the_problem(kwargs, match):
    kwargs = dict(kwargs)
    relevance = kwargs.pop("relevance", None)
    with pytest.raises(ValueError, match=match):
        ops.dpp_greedy_map(torch.randn(1, 10, 4), relevance, **kwargs)


def test_features_must_be_3d():
    with pytest.raises(ValueError, match=r"features must have shape \[B, N, D\]"):
        ops.dpp_greedy_map(torch.randn(10, 4), None, 2)


def _awkward(b, n, d, k, seed):
    """Duplicates (every 5th token copies token 1), relevance in {0, 0.5, 1} (ties, zeros),
    a candidates mask with exactly k eligible in one image."""
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(b, n, d, generator=g)
    if n >= 7:
        f[:, 3::5] = f[:, 1:2]
    rel = torch.randint(0, 3, (b, n), generator=g).float() / 2
    cand = torch.rand(b, n, generator=g) > 0.3
    cand[:, :k] = True
    cand[0] = False
    cand[0, :k] = True
    return f, rel, cand


@pytest.mark.parametrize(
    ("b", "n", "d", "k"),
    [(2, 1, 4, 1), (2, 7, 3, 7), (3, 64, 5, 40), (2, 577, 64, 64), (1, 300, 1000, 150)],
    ids=["N1", "N7-k=N-D<k", "N64-D5-fill", "N577-k64", "N300-k150-D1000"],
)
def test_cpu_paths_make_the_same_choices(b, n, d, k):
    """Compiled lazy greedy, PyTorch lazy queue and the per-step loop: identical picks,
    including ties (duplicates), the fill phase (D < k) and candidate masks."""
    f, rel, cand = _awkward(b, n, d, k, seed=n + d)
    want = rdpp.dpp_greedy_map_materialized(f, rel, k, candidates=cand)
    for name in ("compiled", "lazy"):
        got = PATHS[name](f, rel, k, candidates=cand)
        assert torch.equal(got, want), name
    for row, mask in zip(want.tolist(), cand, strict=True):
        assert len(set(row)) == k and bool(mask[row].all())


def test_compiled_path_can_be_turned_off(monkeypatch):
    from vllm_script.reference import dpp_cpu

    monkeypatch.setenv(dpp_cpu.NUMBA_ENV, "0")
    assert not dpp_cpu.available()
    with pytest.raises(RuntimeError, match="numba"):
        rdpp.dpp_greedy_map_compiled(torch.randn(1, 5, 3), None, 2)
    f = torch.randn(2, 40, 8)
    assert torch.equal(
        rdpp.dpp_greedy_map(f, None, 9), rdpp.dpp_greedy_map_materialized(f, None, 9)
    )


@pytest.fixture
def torch_threads():
    """Set torch's thread count for the test (the compiled DPP's threads follow it outside
    a selection block); restored after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2], ids=["1thread", "2threads"])
@pytest.mark.parametrize(
    ("n", "d", "k"), [(577, 64, 64), (300, 1000, 150), (2001, 96, 321)], ids=lambda v: str(v)
)
def test_compiled_path_threads_make_the_same_choices(n, d, k, threads, torch_threads):
    """The refreshes on numba's threads (torch's count outside a selection block): the
    loop's picks whatever the thread count."""
    pytest.importorskip("numba")
    import os

    from vllm_script.reference import _numba_loops

    f, rel, cand = _awkward(1, n, d, k, seed=n + d + threads)
    torch_threads(threads)
    got = rdpp.dpp_greedy_map_compiled(f, rel, k, candidates=cand)
    assert torch.equal(got, rdpp.dpp_greedy_map_materialized(f, rel, k, candidates=cand))
    if threads > 1:
        assert _numba_loops._parallel_pid == [os.getpid()]


def test_compiled_path_runs_in_a_process_forked_after_it_ran_threaded(torch_threads):
    """vLLM forks its engine: a child of a process that ran the threaded refresh (GNU
    OpenMP, not fork-safe: numba aborts such a child) selects serially, same picks."""
    pytest.importorskip("numba")
    import os
    import pickle

    from vllm_script.reference import dpp_cpu

    f, rel, cand = _awkward(1, 577, 64, 64, seed=5)
    torch_threads(2)
    want = rdpp.dpp_greedy_map_compiled(f, rel, 64, candidates=cand)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report the picks or the error, never return into pytest
        os.close(read_end)
        try:
            # torch's own GNU OpenMP pool is not fork-safe either (its ops hang in a child
            # of a parent that used it): torch on one thread; the DPP still asks for two
            torch.set_num_threads(1)
            dpp_cpu.refresh_threads = lambda: 2
            got = rdpp.dpp_greedy_map_compiled(f, rel, 64, candidates=cand).tolist()
            os.write(write_end, pickle.dumps(got))
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            os.write(write_end, pickle.dumps(repr(exc)))
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert status == 0 and data, f"the forked child died (wait status {status})"
    assert pickle.loads(data) == want.tolist()


@pytest.mark.parametrize(
    ("quality", "entry", "want"),
    [
        # no dot given: orthonormal tokens, every gain 1, ties to the lowest index
        ([1, 1, 1, 1, 1], None, [0, 1, 2]),
        # "f_0 . f_1 = 1" (row 0, column 0): token 1 (odd) against pick 0 has gain 0
        ([1, 1, 1, 1, 1], (0, 0), [0, 2, 3]),
        # "f_2 . f_1 = 1" (row 1, column 0): token 2 (even) against pick 1 has gain 0
        ([1, 1, 1, 1, 1], (1, 0), [0, 1, 3]),
        # the same dot read the other way: picks 0, 2 first; token 1 (odd) against pick 2
        # has gain 0.81 - (0.9 * 1)^2 = 0 (the same fp32 product), tokens 3, 4 keep 0.81
        ([1, 0.9, 1, 0.9, 0.9], (1, 0), [0, 2, 3]),
    ],
    ids=["none", "odd-token-row", "even-token-row", "odd-token-column"],
)
def test_compiled_path_reads_the_shared_dots(quality, entry, want):
    """`cross_dots` (even x odd dots, Script's shared Gram) replace the dots of those pairs:
    five orthonormal tokens, all dots 0, except the one entry the test claims is 1."""
    pytest.importorskip("numba")
    from vllm_script.reference import dpp_cpu

    f, q, eligible = torch.eye(5), torch.tensor(quality), torch.ones(5, dtype=torch.bool)
    cross = torch.zeros(3, 2)  # [ceil(5/2), 5 // 2]: the true dots
    assert dpp_cpu.greedy_one(f, q, eligible, 3, cross_dots=cross).tolist() == (
        dpp_cpu.greedy_one(f, q, eligible, 3).tolist()
    )
    if entry is not None:
        cross[entry] = 1.0
    assert dpp_cpu.greedy_one(f, q, eligible, 3, cross_dots=cross).tolist() == want


@pytest.mark.parametrize(
    "cross", [torch.zeros(2, 2), torch.zeros(3, 3), torch.zeros(3, 2, dtype=torch.float64)]
)
def test_compiled_path_refuses_shared_dots_of_another_shape(cross):
    pytest.importorskip("numba")
    from vllm_script.reference import dpp_cpu

    with pytest.raises(ValueError, match=r"cross_dots must be float32 \[3, 2\] for N=5"):
        dpp_cpu.greedy_one(torch.eye(5), torch.ones(5), torch.ones(5, dtype=bool), 2, cross)
