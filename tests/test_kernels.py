"""Triton kernels vs their PyTorch twins (vllm_script.reference), on awkward shapes.

Without CUDA the kernels run on CPU under TRITON_INTERPRET=1 (set here, before triton is
imported). DPP picks must be *identical* to the twin's (and the twin's to the authors'
per-step loop over a materialised L); bipartite statistics must agree within fp32
tolerance, with degree and argmax exactly equal. Large shapes are marked `gpu`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton", reason="the Triton kernels need the `triton` package")

from vllm_script.kernels import bipartite as kbip  # noqa: E402
from vllm_script.kernels import divprune as kdiv  # noqa: E402
from vllm_script.kernels import dpp as kdpp  # noqa: E402

from vllm_script import ops  # noqa: E402
from vllm_script.reference import bipartite as rbip  # noqa: E402
from vllm_script.reference import contract  # noqa: E402
from vllm_script.reference import divprune as rdiv  # noqa: E402
from vllm_script.reference import dpp as rdpp  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _features(bsz, n, d, *, dups=True, seed=0, dtype=torch.float32):
    """Random features with exact duplicate tokens (every 5th token copies token 1)."""
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(bsz, n, d, generator=g)
    if dups and n >= 7:
        f[:, 3::5] = f[:, 1:2]
    return f.to(dtype)


def _inputs(bsz, n, d, k, *, seed=0):
    """(features, relevance, candidates): B=1 plain (relevance None, all eligible); B>1
    with relevance in {0, 0.5, 1} (ties), some zero, and a candidates mask."""
    f = _features(bsz, n, d, seed=seed)
    if bsz == 1:
        return f, None, None
    g = torch.Generator().manual_seed(seed + 1)
    rel = torch.randint(0, 3, (bsz, n), generator=g).float() / 2
    cand = torch.rand(bsz, n, generator=g) > 0.25
    cand[:, :k] = True  # at least k eligible
    return f, rel, cand


def _to(x):
    return None if x is None else x.to(DEVICE)


def _check_picks(picks, k, cand):
    for b, row in enumerate(picks.tolist()):
        assert len(set(row)) == k, "picks must be distinct"
        if cand is not None:
            assert cand[b, row].all(), "picks must be eligible"


def _ks(n: int) -> list[int]:
    """k = 1, ~N/9 and k = N; at N = 577 not N (577 interpreted steps: minutes, and k = N
    is covered at N = 63 and 200)."""
    return sorted({1, max(1, n // 9), n}) if n < 500 else [1, n // 9]


def _dpp_shapes():
    for n in (1, 2, 7, 63, 577):
        for k in _ks(n):
            for d in (3, 64, 1000):
                for bsz in (1, 3):
                    yield pytest.param(n, k, d, bsz, id=f"N{n}-k{k}-D{d}-B{bsz}")


@pytest.mark.parametrize("n, k, d, bsz", list(_dpp_shapes()))
def test_dpp_kernel_matches_twin(n, k, d, bsz):
    f, rel, cand = _inputs(bsz, n, d, k, seed=n * 7 + d)
    want = rdpp.dpp_greedy_map(f, rel, k, candidates=cand)
    got = kdpp.dpp_greedy_map(_to(f), _to(rel), k, candidates=_to(cand)).cpu()
    assert got.shape == (bsz, k)
    _check_picks(got, k, cand)
    if DEVICE == "cpu":
        assert torch.equal(got, want)  # the interpreter sums in the twin's order
    else:
        # on a GPU near-ties (D = 1000: 1 - cos^2 within an fp32 ulp of 1) may break the
        # other way: the numerics contract, and identical picks up to the first near tie
        _assert_greedy_contract(f, rel, cand, k, got, want)


@pytest.mark.parametrize("materialize", [True, False], ids=["gram", "rows"])
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
@pytest.mark.parametrize(
    "n, k, d", [(63, 20, 1000), (200, 200, 16)], ids=["N63-k20-D1000", "N200-k200-D16"]
)
def test_dpp_kernel_paths_and_dtypes(n, k, d, dtype, materialize):
    f, rel, cand = _inputs(2, n, d, k, seed=5)
    f = f.to(dtype)
    want = rdpp.dpp_greedy_map(f, rel, k, candidates=cand)
    got = kdpp.dpp_greedy_map(_to(f), _to(rel), k, candidates=_to(cand), materialize=materialize)
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("materialize", [True, False], ids=["gram", "rows"])
def test_dpp_kernel_many_tiles(monkeypatch, materialize):
    """Small tiles: the per-tile bests, the tie-window scan across tiles and the C loop."""
    monkeypatch.setattr(kdpp, "_blocks", lambda *a: (16, 16, 16, 16, 16))
    f, rel, cand = _inputs(2, 70, 40, 30, seed=11)
    want = rdpp.dpp_greedy_map(f, rel, 30, candidates=cand)
    got = kdpp.dpp_greedy_map(_to(f), _to(rel), 30, candidates=_to(cand), materialize=materialize)
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dpp_varlen(backend):
    lengths, ks = [7, 1, 63, 0, 200, 2], [7, 1, 7, 0, 50, 1]
    d = 64
    total = sum(lengths)
    f = _features(1, total, d, seed=3)[0]
    g = torch.Generator().manual_seed(4)
    rel = torch.rand(total, generator=g)
    cand = torch.rand(total, generator=g) > 0.2
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    for b, lo in enumerate(cu[:-1].tolist()):
        cand[lo : lo + ks[b]] = True
    got = ops.dpp_greedy_map_varlen(
        _to(f), _to(cu), _to(rel), ks, candidates=_to(cand), backend=backend
    )
    assert [tuple(x.shape) for x in got] == [(k_b,) for k_b in ks]
    for b, (lo, n_b) in enumerate(zip(cu[:-1].tolist(), lengths, strict=True)):
        if n_b == 0:
            continue
        sl = slice(lo, lo + n_b)
        want = rdpp.dpp_greedy_map(f[None, sl], rel[None, sl], ks[b], candidates=cand[None, sl])[0]
        assert torch.equal(got[b].cpu(), want), f"image {b}"


@pytest.mark.parametrize(
    "n, k, d",
    [(577, 577, 64), (577, 64, 1000), (300, 150, 3), (100, 97, 200)],
    ids=["N577-k577-D64", "N577-k64-D1000", "N300-k150-D3", "N100-k97-D200"],
)
def test_twin_matches_materialized_loop(n, k, d):
    """The lazy blocked twin makes exactly the choices of the authors' per-step loop."""
    f, rel, cand = _inputs(3, n, d, k, seed=n + k)
    want = rdpp.dpp_greedy_map_materialized(f, rel, k, candidates=cand)
    assert torch.equal(rdpp.dpp_greedy_map_lazy(f, rel, k, candidates=cand), want)


def test_twin_large_n_memory():
    """N = 16384: the twin must not form N x N (1 GiB in fp32); peak RSS growth < 512 MiB."""
    code = textwrap.dedent(
        """
        import resource, torch
        torch.manual_seed(0)
        f = torch.randn(1, 16384, 256); r = torch.rand(1, 16384)
        from vllm_script.reference.dpp import MATERIALISE_MAX_N, dpp_greedy_map
        assert f.shape[1] > MATERIALISE_MAX_N  # the O(N (K + D)) path
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = dpp_greedy_map(f, r, 64)
        assert out.shape == (1, 64) and len(set(out[0].tolist())) == 64
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    grown_mib = int(res.stdout.split()[-1])
    assert grown_mib < 512, f"peak RSS grew by {grown_mib} MiB"


def _bip_shapes():
    for n in (1, 2, 7, 63, 577):
        for d in (3, 64, 1000):
            for bsz in (1, 3):
                yield pytest.param(n, d, bsz, id=f"N{n}-D{d}-B{bsz}")


def _assert_stats_close(got, want, n_dst):
    assert torch.equal(got.degree.cpu(), want.degree)
    assert torch.equal(got.best_dst.cpu(), want.best_dst)
    atol = 1e-5 * max(n_dst, 1)
    torch.testing.assert_close(got.edge_sum.cpu(), want.edge_sum, atol=atol, rtol=1e-5)
    torch.testing.assert_close(got.total_sum.cpu(), want.total_sum, atol=atol, rtol=1e-5)
    torch.testing.assert_close(got.best_sim.cpu(), want.best_sim, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("n, d, bsz", list(_bip_shapes()))
def test_bipartite_kernel_matches_twin(n, d, bsz):
    f = _features(bsz, n, d, seed=n + d)
    want = rbip.bipartite_stats(f, 0.2)
    got = kbip.bipartite_stats(_to(f), 0.2)
    assert got.degree.shape == (bsz, (n + 1) // 2)
    _assert_stats_close(got, want, n // 2)
    if n >= 7:  # token 3 duplicates token 1 (both dst): the tie goes to dst index 0
        assert int(got.best_dst[0, 0]) == int(want.best_dst[0, 0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_bipartite_kernel_many_tiles_low_precision(monkeypatch, dtype):
    monkeypatch.setattr(kbip, "_blocks", lambda *a: (16, 16, 16, 32))  # 3 dst splits
    f = _features(2, 151, 72, seed=9, dtype=dtype)
    _assert_stats_close(kbip.bipartite_stats(_to(f), 0.1), rbip.bipartite_stats(f, 0.1), 75)


def test_backend_dispatch(monkeypatch):
    f, rel, _ = _inputs(1, 20, 8, 5)
    with pytest.raises(ValueError, match="backend"):
        ops.dpp_greedy_map(f, rel, 5, backend="cuda")
    calls = []
    monkeypatch.setattr(
        kdpp, "dpp_greedy_map", lambda *a, **kw: calls.append("triton") or torch.zeros(1, 5)
    )
    ops.dpp_greedy_map(_to(f), _to(rel), 5, backend="triton")
    assert calls == ["triton"]
    ops.dpp_greedy_map(f, rel, 5, backend="auto")  # CPU tensors: torch, not the kernel
    assert calls == ["triton"]
    if torch.cuda.is_available():
        ops.dpp_greedy_map(f.cuda(), _to(rel), 5, backend="auto")
        assert calls == ["triton", "triton"]
    a = ops.bipartite_stats(_to(f), 0.3, backend="triton")
    b = ops.bipartite_stats(f, 0.3, backend="torch")
    assert torch.equal(a.best_dst.cpu(), b.best_dst)


def _divprune_shapes():
    for n in (1, 2, 7, 63, 577):
        for k in _ks(n):
            for d in (3, 64):
                yield pytest.param(n, k, d, 2, id=f"N{n}-k{k}-D{d}-B2")


@pytest.mark.parametrize("n, k, d, bsz", list(_divprune_shapes()))
def test_divprune_kernel_matches_twin(n, k, d, bsz):
    """Exact duplicates (every 5th token copies token 1) make exact ties: lowest index."""
    f = _features(bsz, n, d, seed=n + d)
    want = rdiv.divprune_order(f, k)
    for materialize in (True, False):
        got = kdiv.divprune_order(_to(f), k, materialize=materialize).cpu()
        assert torch.equal(got, want), f"materialize={materialize}"


@pytest.mark.parametrize("materialize", [True, False], ids=["gram", "rows"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_divprune_kernel_many_tiles_low_precision(monkeypatch, materialize, dtype):
    """Small tiles: per-tile bests across 5 tiles, the nn kernel's column loop."""
    monkeypatch.setattr(kdiv, "_blocks", lambda *a: (16, 16, 16))
    f = _features(3, 70, 40, seed=12, dtype=dtype)
    want = rdiv.divprune_order(f, 30)
    got = kdiv.divprune_order(_to(f), 30, materialize=materialize)
    assert torch.equal(got.cpu(), want)


def test_divprune_dispatch_and_validation():
    f = _features(2, 30, 8)
    assert torch.equal(
        ops.divprune_order(_to(f), 5, backend="triton").cpu(),
        ops.divprune_order(f, 5, backend="torch"),
    )
    for k in (0, 31):
        with pytest.raises(ValueError, match=f"k={k} must be in \\[1, N=30\\]"):
            ops.divprune_order(f, k)


def test_varlen_validation():
    f = torch.randn(10, 4)
    cu = torch.tensor([0, 4, 10])
    with pytest.raises(ValueError, match="cu_seqlens"):
        ops.dpp_greedy_map_varlen(f, torch.tensor([0, 4, 9]), None, [1, 1])
    with pytest.raises(ValueError, match="k\\[1\\]"):
        ops.dpp_greedy_map_varlen(f, cu, None, [1, 7])
    with pytest.raises(ValueError, match="budgets"):
        ops.dpp_greedy_map_varlen(f, cu, None, [1])
    out = ops.dpp_greedy_map_varlen(f, cu, None, torch.tensor([4, 6]))
    assert sorted(out[0].tolist()) == [0, 1, 2, 3] and sorted(out[1].tolist()) == list(range(6))


# ---- large shapes: real GPU kernels, under the numerics contract ------------------
# On a GPU the fp32 sums run in another order (tensor cores, tile reductions), so the
# kernels' results are checked against float64 recomputations of the definitions
# (vllm_script.reference.contract; README "Numerics contract"), and the picks against the
# twin's up to its first near tie.


def _assert_greedy_contract(f, rel, cand, k, got, want):
    for b in range(f.shape[0]):
        q = None if rel is None else rel[b]
        mask = None if cand is None else cand[b]
        picks = got[b].tolist()
        assert contract.greedy_violations(f[b].cuda(), q, picks, eligible=mask) == [], b
        tie = contract.first_near_tie(f[b].cuda(), q, want[b].tolist())
        assert picks[:tie] == want[b].tolist()[:tie], f"image {b}: differs before step {tie}"


@gpu
@needs_cuda
@pytest.mark.parametrize("materialize", [True, False], ids=["gram", "rows"])
@pytest.mark.parametrize(
    "n, k, d, dtype",
    [(576, 64, 4096, torch.float32), (2880, 320, 4096, torch.float32),
     (2880, 320, 4096, torch.bfloat16)],
    ids=["llava15-fp32", "llavanext-fp32", "llavanext-bf16"],
)  # fmt: skip
def test_dpp_gpu_large(n, k, d, dtype, materialize):
    f, rel, cand = _inputs(2, n, d, k, seed=1)
    f = f.to(dtype)
    want = rdpp.dpp_greedy_map(f, rel, k, candidates=cand)
    got = kdpp.dpp_greedy_map(
        f.cuda(), rel.cuda(), k, candidates=cand.cuda(), materialize=materialize
    ).cpu()
    _assert_greedy_contract(f, rel, cand, k, got, want)


@gpu
@needs_cuda
def test_dpp_gpu_graph_replay_and_batching_are_exact(monkeypatch):
    """Same GPU, same summation order: graph replays, eager launches and images batched
    with others give identical picks (bitwise: the arithmetic per image is the same)."""
    from vllm_script.kernels import launch as klaunch

    f, rel, _ = _inputs(16, 2880, 4096, 320, seed=4)
    f, rel = f.to(torch.bfloat16).cuda(), rel.cuda()
    first = kdpp.dpp_greedy_map(f, rel, 320)  # eager, then the bucket's graph is captured
    replay = kdpp.dpp_greedy_map(f, rel, 320)
    monkeypatch.setattr(kdpp, "_GRAPHS", klaunch.StepGraphs("test"))
    kdpp._GRAPHS.disabled = True
    eager = kdpp.dpp_greedy_map(f, rel, 320)
    single = torch.cat([kdpp.dpp_greedy_map(f[b : b + 1], rel[b : b + 1], 320) for b in (0, 7)])
    assert torch.equal(first, replay) and torch.equal(first, eager)
    assert torch.equal(single, first[[0, 7]])


@gpu
@needs_cuda
def test_dpp_gpu_video_varlen():
    lengths, ks = [16384, 2880, 577], [2048, 320, 64]
    f = _features(1, sum(lengths), 1024, seed=2)[0]
    rel = torch.rand(sum(lengths))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    got = kdpp.dpp_greedy_map_varlen(f.cuda(), cu.cuda(), rel.cuda(), ks)
    for b, (lo, n_b) in enumerate(zip(cu[:-1].tolist(), lengths, strict=True)):
        sl = slice(lo, lo + n_b)
        picks = got[b].tolist()
        assert contract.greedy_violations(f[sl].cuda(), rel[sl], picks) == [], b
        assert len(set(picks)) == ks[b]


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n, d", [(2880, 4096), (16384, 1024)], ids=["llavanext", "video"])
def test_bipartite_gpu_large(n, d, dtype):
    f = _features(2, n, d, seed=3, dtype=dtype)
    stats = kbip.bipartite_stats(f.cuda(), 0.2)
    for image in (0, 1):
        assert contract.bipartite_violations(f.cuda(), 0.2, stats, image) == [], image


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_divprune_gpu_large(dtype):
    f = _features(3, 2880, 4096, seed=5, dtype=dtype)
    for materialize in (True, False):
        got = kdiv.divprune_order(f.cuda(), 320, materialize=materialize).cpu()
        for b in range(3):
            assert contract.divprune_violations(f[b].cuda(), got[b].tolist()) == [], b


# ---- the GPU path's host logic, run on CPU under the interpreter ----------------------


def test_gram_groups_by_hand():
    # 4-byte N^2 matrices: 10x10 = 400 B, 20x20 = 1600 B
    assert kdpp.gram_groups([10, 10, 20, 10], 2000) == [[0, 1], [2, 3]]  # 800, 1600 + 400
    assert kdpp.gram_groups([10, 10, 20, 10], 1999) == [[0, 1], [2], [3]]
    assert kdpp.gram_groups([10, 10, 10], 1200) == [[0, 1, 2]]
    assert kdpp.gram_groups([30], 100) == [[0]]  # alone in its group even when too large


def test_step_graphs_serve_calls_in_and_out_of_inference_mode(monkeypatch):
    """A bucket captured under torch.inference_mode() (as in a model's forward) is
    replayed outside it and back: its cached descriptor is updated in place each call
    (on an H200 this raised "Inplace update to inference tensor outside InferenceMode")."""
    from vllm_script.kernels import launch as klaunch

    replays = []
    graph = SimpleNamespace(replay=lambda: replays.append(1))
    monkeypatch.setattr(klaunch.StepGraphs, "_capture", staticmethod(lambda desc, steps: graph))
    graphs = klaunch.StepGraphs("test")
    seen = []

    def steps(desc_dev):
        seen.append(desc_dev.tolist())

    key = (torch.device("cpu"), (1, 1), 32, 16, 16)
    with torch.inference_mode():
        graphs.run(key, torch.tensor([1, 2]), steps)  # eager run, then capture
    graphs.run(key, torch.tensor([3, 4]), steps)  # replay outside inference mode
    with torch.inference_mode():
        graphs.run(key, torch.tensor([5, 6]), steps)
    assert seen == [[1, 2]] and len(replays) == 2
    assert graphs.graphs[key][1].tolist() == [5, 6]


@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="the interpreter's stand-in for the GPU path; on CUDA the gpu tests run the real one",
)
@pytest.mark.parametrize("kernel", ["dpp", "divprune"])
def test_gpu_host_path_on_cpu(monkeypatch, kernel):
    """The GPU decisions (MMA tiles, power-of-two grid buckets with padded images, steps
    rounded up, batch split by the Gram budget, graph capture falling back to host
    launches when it fails) run through the interpreter: same picks as the twin."""
    from vllm_script.kernels import launch as klaunch

    monkeypatch.setattr(kdpp, "gpu_path", lambda device: True)
    monkeypatch.setattr(kdpp, "gram_max_bytes", lambda: 2 * 150 * 150 * 4)  # two per group
    monkeypatch.setattr(kdpp, "_GRAPHS", klaunch.StepGraphs("test"))
    monkeypatch.setattr(kdiv, "gpu_path", lambda device: True)
    monkeypatch.setattr(kdiv, "gram_max_bytes", lambda: 2 * 150 * 150 * 4)
    monkeypatch.setattr(kdiv, "_GRAPHS", klaunch.StepGraphs("test"))
    monkeypatch.setattr(kbip, "gpu_path", lambda device: True)
    f = _features(5, 150, 24, dups=False, seed=21)  # fp32: no duplicate ties under tl.dot
    rel = torch.rand(5, 150, generator=torch.Generator().manual_seed(22))
    if kernel == "dpp":
        got = kdpp.dpp_greedy_map(f, rel, 40)  # 5 images -> groups of 2, 2, 1
        want = rdpp.dpp_greedy_map(f, rel, 40)
        graphs = kdpp._GRAPHS
    else:
        got = kdiv.divprune_order(f, 40)
        want = rdiv.divprune_order(f, 40)
        graphs = kdiv._GRAPHS
    assert torch.equal(got, want)
    assert graphs.disabled  # no CUDA here: capture failed once, host launches since
