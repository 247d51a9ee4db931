"""Start-up warm-up and backend choice: no request pays a JIT compile, a kernel that fails
stops start-up with a message that says what to do, and at run time a failing kernel falls
back to the PyTorch twins instead of killing the engine."""

from __future__ import annotations

import logging
import os
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton", reason="the Triton kernels need the `triton` package")

from vllm_script.kernels import dpp as kdpp  # noqa: E402
from vllm_script.kernels.launch import KernelError  # noqa: E402

from vllm_script import ops, warmup  # noqa: E402
from vllm_script.reference import dpp as rdpp  # noqa: E402

STEP_FAILURE = KernelError(
    "vllm_script.kernels.dpp._dpp_step_kernel",
    AssertionError("initial value for `j` is of type int32[], but the then block redefines it"),
)
# the kernels' device: CPU tensors reach Triton only under the interpreter
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _process_default():
    yield
    ops.set_default_backend(None)


def test_every_warmup_step_runs():
    """The warm-up's inputs are valid for every kernel it reaches (without CUDA under the
    interpreter; on a GPU the same steps compile and capture the step graphs)."""
    names = []
    for name, step in warmup._steps(DEVICE, torch.bfloat16, 48):
        step()
        names.append(name)
    assert names == [
        "bipartite (GSP)",
        "dpp (QCSP / Script, Gram path)",
        "dpp (rows path, long videos)",
        "divprune",
    ]


def test_warmup_failure_names_kernel_versions_and_the_way_out(monkeypatch):
    def fail():
        raise STEP_FAILURE

    monkeypatch.setattr(warmup, "_steps", lambda *a: [("dpp (QCSP / Script, Gram path)", fail)])
    with pytest.raises(warmup.KernelWarmupError) as err:
        warmup.warm_up(torch.device("cuda"), torch.bfloat16, 4096)
    message = str(err.value)
    for part in (
        "refuses to start",
        "dpp (QCSP / Script, Gram path)",
        "_dpp_step_kernel",
        "Triton ",
        "CUDA ",
        '"backend": "torch"',
        "VLLM_SCRIPT_BACKEND=torch",
    ):
        assert part in message, part


def test_warmup_skips_triton_when_the_backend_is_torch(monkeypatch):
    monkeypatch.setattr(warmup, "_steps", lambda *a: pytest.fail("Triton warm-up ran"))
    ops.set_default_backend("torch")
    assert warmup.warm_up(torch.device("cuda"), torch.bfloat16, 64) == []


def test_cpu_warmup_compiles_the_cpu_greedy():
    from vllm_script.reference import dpp_cpu

    timings = warmup.warm_up(torch.device("cpu"), torch.bfloat16, 64)
    assert [name for name, _ in timings] == (
        ["compiled CPU loops (DPP, GSP)"] if dpp_cpu.available() else []
    )


@pytest.mark.parametrize("steps", ["cpu", "kernels"])
def test_warmup_under_the_models_default_dtype(steps):
    """vLLM builds the model, and so runs the warm-up, with the model's dtype (bf16) as
    torch's default: nothing may depend on the default being fp32 (a bf16 buffer made
    `.numpy()` raise and stopped the engine)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        if steps == "cpu":
            warmup.warm_up(torch.device("cpu"), torch.bfloat16, 64)
        else:
            for _, step in warmup._steps(DEVICE, torch.bfloat16, 32):
                step()
    finally:
        torch.set_default_dtype(previous)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 40, 16, generator=g), torch.rand(2, 40, generator=g)


def test_auto_falls_back_to_the_twin_when_a_kernel_fails(monkeypatch, caplog):
    f, rel = _inputs()

    def broken(*args, **kwargs):
        raise STEP_FAILURE

    monkeypatch.setattr(kdpp, "dpp_greedy_map", broken)
    ops.set_default_backend("triton")  # what "auto" means on a CUDA device
    with caplog.at_level(logging.ERROR, logger="vllm_script"):
        got = ops.dpp_greedy_map(f, rel, 9)
    assert torch.equal(got, rdpp.dpp_greedy_map(f, rel, 9))
    assert ops.default_backend() == "torch"  # later calls go straight to the twin
    assert "_dpp_step_kernel" in caplog.text and "VLLM_SCRIPT_BACKEND=torch" in caplog.text


def test_explicit_triton_backend_raises(monkeypatch):
    f, rel = _inputs()

    def broken(*args, **kwargs):
        raise STEP_FAILURE

    monkeypatch.setattr(kdpp, "dpp_greedy_map", broken)
    with pytest.raises(KernelError, match="_dpp_step_kernel"):
        ops.dpp_greedy_map(f, rel, 9, backend="triton")


def test_default_backend_from_the_environment(monkeypatch):
    f, rel = _inputs()
    calls = []
    monkeypatch.setattr(kdpp, "dpp_greedy_map", lambda *a, **kw: calls.append(1) or None)
    monkeypatch.setenv(ops.BACKEND_ENV, "triton")
    ops.dpp_greedy_map(f, rel, 9)
    assert calls == [1]
    monkeypatch.setenv(ops.BACKEND_ENV, "torch")
    ops.dpp_greedy_map(f, rel, 9)
    assert calls == [1]
    monkeypatch.setenv(ops.BACKEND_ENV, "cuda")
    with pytest.raises(ValueError, match="VLLM_SCRIPT_BACKEND='cuda'"):
        ops.dpp_greedy_map(f, rel, 9)


def test_server_backend_setting_reaches_the_worker(monkeypatch):
    """`"backend": "torch"` in the server settings: the model sets the process default."""
    from vllm_script.config import parse_server_settings
    from vllm_script.models.common import ScriptModelMixin

    model = ScriptModelMixin()
    model.script_server_settings = parse_server_settings({"backend": "torch"})
    text_config = SimpleNamespace(hidden_size=32)
    vllm_config = SimpleNamespace(
        model_config=SimpleNamespace(
            hf_config=SimpleNamespace(get_text_config=lambda: text_config), dtype=torch.float32
        ),
        device_config=SimpleNamespace(device="cpu"),
    )
    model._script_warm_up(vllm_config)
    assert ops.default_backend() == "torch"
