"""The numerics contract (vllm_script.reference.contract): the checks the GPU tests assert,
themselves checked here: they accept the twins' and the interpreted kernels' results and
reject broken ones."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton", reason="the Triton kernels need the `triton` package")

from vllm_script.kernels import bipartite as kbip  # noqa: E402
from vllm_script.kernels import divprune as kdiv  # noqa: E402
from vllm_script.kernels import dpp as kdpp  # noqa: E402

from vllm_script.reference import bipartite as rbip  # noqa: E402
from vllm_script.reference import contract  # noqa: E402
from vllm_script.reference import divprune as rdiv  # noqa: E402
from vllm_script.reference import dpp as rdpp  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(n, d, seed, dtype=torch.float32, dups=True):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n, d, generator=g)
    if dups:
        f[3::5] = f[1]
    return f.to(dtype), torch.rand(n, generator=g)


def test_cosine_tolerance_by_hand():
    u = 2.0**-24
    assert contract.cosine_tolerance(4096, torch.bfloat16) == (2 * 4096 + 8) * u
    assert contract.cosine_tolerance(4096, torch.float32) == (2 * 4096 + 8) * u + 2.0**-20
    assert contract.cosine_tolerance(1, torch.float16) == 10 * u


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n, k, d", [(200, 40, 64), (63, 63, 16), (100, 30, 8)], ids=str)
def test_twin_and_kernel_picks_keep_the_contract(n, k, d, dtype):
    """D = 8 < k: the fill phase; duplicates: exact ties."""
    f, q = _inputs(n, d, seed=n + d, dtype=dtype)
    twin = rdpp.dpp_greedy_map(f[None], q[None], k)[0].tolist()
    kernel = kdpp.dpp_greedy_map(f[None].to(DEVICE), q[None].to(DEVICE), k)[0].tolist()
    assert contract.greedy_violations(f, q, twin) == []
    assert contract.greedy_violations(f, q, kernel) == []
    tie = contract.first_near_tie(f, q, twin)
    assert kernel[:tie] == twin[:tie]


def test_greedy_check_rejects_a_bad_pick():
    f, q = _inputs(120, 64, seed=3, dups=False)
    picks = rdpp.dpp_greedy_map(f[None], q[None], 20)[0].tolist()
    gains, diag = contract.greedy_gains(f, q, picks)
    done = torch.tensor([i in picks[:5] for i in range(120)])
    worst = int(gains[5].masked_fill(done, 9).argmin())
    bad = picks[:5] + [worst] + [i for i in picks[5:] if i != worst][:14]
    assert any(v.startswith("step 5:") for v in contract.greedy_violations(f, q, bad))
    assert contract.greedy_violations(f, q, picks[:3] + [picks[1]])[0].startswith("step 3:")
    ineligible = torch.ones(120, dtype=torch.bool)
    ineligible[picks[0]] = False
    assert contract.greedy_violations(f, q, picks, eligible=ineligible)[0].startswith("step 0:")


def test_greedy_check_rejects_a_wrong_fill_order():
    """Rank 2: after two picks every gain is zero; then the most relevant token first."""
    g = torch.Generator().manual_seed(0)
    f = torch.randn(10, 2, generator=g)
    q = torch.tensor([0.1, 0.9, 0.5, 0.8, 0.3, 0.95, 0.2, 0.7, 0.6, 0.4])
    picks = rdpp.dpp_greedy_map(f[None], q[None], 6)[0].tolist()
    assert contract.greedy_violations(f, q, picks) == []
    rest = [i for i in sorted(range(10), key=lambda i: -float(q[i])) if i not in picks[:2]]
    assert picks[2:] == rest[:4]  # by hand: descending relevance
    swapped = picks[:2] + [rest[1], rest[0]] + rest[2:4]
    assert contract.greedy_violations(f, q, swapped)[0].startswith("step 2:")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bipartite_stats_keep_the_contract(dtype):
    f = torch.stack([_inputs(151, 72, seed=s, dtype=dtype)[0] for s in (1, 2)])
    for stats in (rbip.bipartite_stats(f, 0.1), kbip.bipartite_stats(f.to(DEVICE), 0.1)):
        for image in (0, 1):
            assert contract.bipartite_violations(f, 0.1, stats, image) == []


def test_bipartite_check_rejects_broken_stats():
    f = _inputs(151, 72, seed=1)[0][None]
    stats = rbip.bipartite_stats(f, 0.1)
    bad_degree = stats._replace(degree=stats.degree + 100)
    assert "degree" in contract.bipartite_violations(f, 0.1, bad_degree)[0]
    bad_best = stats._replace(best_dst=(stats.best_dst + 1) % 75)
    assert "best dst" in contract.bipartite_violations(f, 0.1, bad_best)[-1]
    bad_sum = stats._replace(total_sum=stats.total_sum + 0.5)
    assert "total sum" in " ".join(contract.bipartite_violations(f, 0.1, bad_sum))


def test_divprune_orders_keep_the_contract():
    f = torch.stack([_inputs(90, 32, seed=s)[0] for s in (4, 5)])
    for order in (rdiv.divprune_order(f, 30), kdiv.divprune_order(f.to(DEVICE), 30).cpu()):
        for image in (0, 1):
            assert contract.divprune_violations(f[image], order[image].tolist()) == []
    good = rdiv.divprune_order(f, 30)[0].tolist()
    assert contract.divprune_violations(f[0], good[:4] + [good[1]])[0].startswith("step 4:")
    reversed_tail = good[:2] + good[2:][::-1]
    assert contract.divprune_violations(f[0], reversed_tail)
