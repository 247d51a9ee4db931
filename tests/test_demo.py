"""README command 1 (`python -m vllm_script.demo`) and the model presets it shares with
the tests and the benchmarks."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_script import testing
from vllm_script.demo import format_table, read_rows
from vllm_script.testing import MODEL_PRESETS, model_preset


def test_presets_are_named_once_and_the_writers_default_to_tiny():
    assert set(MODEL_PRESETS) == {"tiny", "small", "bench"}
    writers = [testing._write_llava_family] + [
        getattr(testing, name) for name in dir(testing) if name.startswith("write_tiny_")
    ]
    for writer in writers:  # every writer takes every preset key, defaulting to tiny
        params = inspect.signature(writer).parameters
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            continue  # forwards to _write_llava_family, checked itself
        defaults = {key: params[key].default for key in MODEL_PRESETS["tiny"]}
        assert defaults == MODEL_PRESETS["tiny"], writer.__name__
    # small and bench share the decoder; bench has the bigger vision tower
    decoder = ("text_hidden", "text_layers", "head_dim", "init_std")
    assert all(MODEL_PRESETS["small"][k] == MODEL_PRESETS["bench"][k] for k in decoder)
    assert MODEL_PRESETS["bench"]["vision_hidden"] > MODEL_PRESETS["small"]["vision_hidden"]


def test_model_preset_is_a_copy_and_unknown_names_are_refused():
    sizes = model_preset("bench")
    sizes["text_layers"] = 1
    assert MODEL_PRESETS["bench"]["text_layers"] == 8
    with pytest.raises(ValueError, match=r"unknown model preset 'huge'; allowed: \['bench'"):
        model_preset("huge")


@pytest.mark.e2e
def test_demo_prints_progress_then_its_table_and_writes_it(tiny_llava, tmp_path):
    out_csv = tmp_path / "demo.csv"
    args = ["--size", "tiny", "--model-dir", str(tiny_llava), "--requests", "1"]
    out = subprocess.run(
        [sys.executable, "-m", "vllm_script.demo", *args, "--out", str(out_csv)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    # quiet: nothing but the demo's own lines (vLLM's log went to the file it names)
    assert out.stderr == "", out.stderr[-2000:]
    table = format_table(read_rows(out_csv))
    lines = out.stdout.splitlines()
    own = [line for line in lines if line.startswith("[demo]") or line in table.splitlines()]
    assert own == [line for line in lines if line], out.stdout
    assert table in out.stdout
    log = next(line for line in lines if line.startswith("[demo] vLLM's log: "))
    log_path = log.split(": ", 1)[1].split(" ")[0]
    assert "vllm-script: server-wide pruning settings" in Path(log_path).read_text()
    off, on = read_rows(out_csv)
    assert (int(off["image_tokens"]), int(on["image_tokens"])) == (576, 64)
    assert int(off["prompt_tokens"]) - int(on["prompt_tokens"]) == 576 - 64
