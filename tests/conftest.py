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
