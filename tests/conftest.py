import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

# a source checkout run without installing the project (the GPU check machine)
sys.path.insert(0, str(Path(__file__).parents[1]))
from vllm_script._source_tree import map_kernels  # noqa: E402

map_kernels()


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> Path:
    from vllm_script.testing import model_preset, write_tiny_llava

    return write_tiny_llava(tmp_path_factory.mktemp("ckpt") / "tiny-llava", **model_preset("tiny"))


@pytest.fixture(scope="session")
def clip_dir(tiny_llava, tmp_path_factory) -> Path:
    """A tiny random CLIP checkpoint (text tower + projections) matching tiny_llava."""
    from engine_utils import vision_width

    from vllm_script.clip_text import write_tiny_clip_checkpoint

    path = tmp_path_factory.mktemp("clip") / "tiny-clip"
    return write_tiny_clip_checkpoint(path, vision_width(tiny_llava))


@pytest.fixture(scope="session")
def tiny_llava_next(tmp_path_factory) -> Path:
    from vllm_script.testing import model_preset, write_tiny_llava_next

    path = tmp_path_factory.mktemp("ckpt") / "tiny-llava-next"
    return write_tiny_llava_next(path, **model_preset("tiny"))


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> Path:
    from vllm_script.testing import model_preset, write_tiny_qwen2_5_vl

    path = tmp_path_factory.mktemp("ckpt") / "tiny-qwen2.5-vl"
    return write_tiny_qwen2_5_vl(path, **model_preset("tiny"))


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory) -> Path:
    from vllm_script.testing import write_tiny_gemma3

    return write_tiny_gemma3(tmp_path_factory.mktemp("ckpt") / "tiny-gemma3")


@pytest.fixture(scope="session")
def tiny_internvl(tmp_path_factory) -> Path:
    from vllm_script.testing import write_tiny_internvl

    return write_tiny_internvl(tmp_path_factory.mktemp("ckpt") / "tiny-internvl")


@pytest.fixture(scope="session")
def tiny_llava_onevision(tmp_path_factory) -> Path:
    from vllm_script.testing import write_tiny_llava_onevision

    return write_tiny_llava_onevision(tmp_path_factory.mktemp("ckpt") / "tiny-llava-onevision")


@pytest.fixture(scope="session")
def tiny_qwen2_vl(tmp_path_factory) -> Path:
    from vllm_script.testing import write_tiny_qwen2_vl

    return write_tiny_qwen2_vl(tmp_path_factory.mktemp("ckpt") / "tiny-qwen2-vl")


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
