import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> Path:
    from vllm_script.testing import write_tiny_llava

    return write_tiny_llava(tmp_path_factory.mktemp("ckpt") / "tiny-llava")


@pytest.fixture(scope="session")
def tiny_llava_next(tmp_path_factory) -> Path:
    from vllm_script.testing import write_tiny_llava_next

    return write_tiny_llava_next(tmp_path_factory.mktemp("ckpt") / "tiny-llava-next")


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> Path:
    from vllm_script.testing import write_tiny_qwen2_5_vl

    return write_tiny_qwen2_5_vl(tmp_path_factory.mktemp("ckpt") / "tiny-qwen2.5-vl")


@pytest.fixture(scope="module")
def server(tiny_llava):
    """The OpenAI server the README documents (CPU route), on loopback, one per module."""
    from server_utils import SERVER_SETTINGS, VllmServer

    srv = VllmServer(tiny_llava, settings=SERVER_SETTINGS)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> Path:
    from vllm_script.testing import write_tiny_qwen3_vl

    return write_tiny_qwen3_vl(tmp_path_factory.mktemp("ckpt") / "tiny-qwen3-vl")


@pytest.fixture(scope="session")
def tiny_qwen3_moe(tmp_path_factory) -> Path:
    from vllm_script.testing import write_tiny_qwen3_vl

    return write_tiny_qwen3_vl(tmp_path_factory.mktemp("ckpt") / "tiny-qwen3-vl-moe", num_experts=4)
