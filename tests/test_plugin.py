"""The plugin as vLLM sees it: entry point, loader, registration, version check, CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vllm_script import plugin


def test_vllm_plugin_loader_finds_and_loads_the_entry_point():
    # vLLM logs and swallows a plugin's import error; this makes a broken import fail.
    from vllm.plugins import load_plugins_by_group

    plugins = load_plugins_by_group("vllm.general_plugins")
    assert "script" in plugins, f"entry point 'script' not loaded; got {sorted(plugins)}"
    assert plugins["script"] is plugin.register


def test_register_is_idempotent_and_overrides_llava():
    from vllm import ModelRegistry

    plugin.register()
    plugin.register()
    cls = ModelRegistry._try_load_model_cls("LlavaForConditionalGeneration")
    assert cls.__module__ == "vllm_script.models.llava"
    assert cls.__name__ == "ScriptLlavaForConditionalGeneration"


def test_unsupported_vllm_version_is_refused_clearly(monkeypatch):
    monkeypatch.delenv(plugin.ALLOW_UNSUPPORTED_ENV, raising=False)
    with pytest.raises(
        RuntimeError, match=r"supports vLLM 0\.32\.x, 0\.33\.x; found vLLM 0\.20\.1"
    ):
        plugin.check_vllm_version("0.20.1")
    plugin.check_vllm_version("0.32.0+cpu")
    plugin.check_vllm_version("0.33.0")
    monkeypatch.setenv(plugin.ALLOW_UNSUPPORTED_ENV, "1")
    plugin.check_vllm_version("0.99.0")


def test_package_import_is_light():
    code = (
        "import sys, vllm_script; bad = {'vllm', 'triton'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_shim_runs_vllms_cli():
    out = subprocess.run(
        [sys.executable, "-m", "vllm_script", "--version"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1].startswith("0.3")
