"""Every Triton launch the CUDA path can produce compiles for sm_80 and sm_90, without a GPU.

Triton's interpreter (TRITON_INTERPRET=1, which runs the kernel tests on CPU) is not a
compiler: it accepted a step kernel that the real compiler rejects ("initial value for `j`
is of type int32, but the then block redefines it as int64"), and the GPU route crashed
on its first pruned image. Here the launchers are driven on CPU tensors under
`vllm_script.kernels.launch.record_launches()` (GPU decisions: tile sizes, dot modes, Gram
or rows, graph buckets; every dtype and constexpr flag), and each distinct specialisation
is compiled down to cubin with Triton's own compiler (`triton.compile(ASTSource(...),
target=GPUTarget("cuda", cc, 32))`), in a child process without TRITON_INTERPRET.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="the Triton kernels need the `triton` package")

CHILD = Path(__file__).with_name("kernel_compile_child.py")
KERNEL_MODULES = ("dpp", "bipartite", "divprune")


def _kernel_names() -> set[str]:
    """Names of the launched kernels defined in vllm_script.kernels (by convention `*_kernel`)."""
    names = set()
    for module in KERNEL_MODULES:
        source = (Path(__file__).parents[1] / "kernels" / f"{module}.py").read_text()
        names.update(
            line.split("(")[0].removeprefix("def ").strip()
            for line in source.splitlines()
            if line.startswith("def _") and line.split("(")[0].endswith("_kernel")
        )
    return names


@pytest.fixture(scope="module")
def report() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(
        [sys.executable, str(CHILD)], capture_output=True, text=True, env=env, timeout=1800
    )
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout)


def test_every_launch_configuration_compiles_for_sm80_and_sm90(report):
    failures = [
        f"{e['kernel']} for {e['target']}: {e['error']}\n  specialisation: {e['key']}"
        for e in report["failures"]
    ]
    assert not failures, "\n".join(failures)


def test_every_kernel_and_target_was_compiled(report):
    compiled = {(e["kernel"], e["target"]) for e in report["configs"]}
    names = _kernel_names()
    assert names, "no kernels found"
    missing = {(n, t) for n in names for t in ("sm_80", "sm_90")} - compiled
    assert not missing, f"never compiled: {sorted(missing)}"
