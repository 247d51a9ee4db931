"""Long Qwen2.5-VL videos through the OpenAI server (issue 10: nothing a request sends
may raise in the worker).

A video's temporal positions are `t * second_per_grid * tokens_per_second`: four frames
at 0.002 fps are 2000 s apart, so a dozen frames reach offsets past 8192 (which raised
in the worker before and stopped the server). Such positions are carried; a video whose
positions pass the model's rotary table (4 x 8192 rows for the tiny checkpoint) is
refused with a 400, pruned or not; the server serves the next request either way.
"""

from __future__ import annotations

import base64

import pytest

pytestmark = pytest.mark.e2e

SETTINGS = {"method": "script", "budget": 10}
FPS = 0.002  # the lowest frame rate OpenCV writes into an mp4 here


@pytest.fixture(scope="module")
def qwen_server(tiny_qwen):
    from server_utils import VllmServer

    server = VllmServer(
        tiny_qwen,
        settings=SETTINGS,
        extra_args=("--limit-mm-per-prompt", '{"image": 1, "video": 1}'),
    )
    server.start()
    yield server
    server.stop()


def video_url(tmp_path, frames: int, fps: float = FPS) -> str:
    """A base64 mp4 data URL of `frames` frames of moving blobs at `fps`."""
    import cv2

    from vllm_script.testing import random_video

    array, _ = random_video(3, frames=frames)
    path = tmp_path / f"video-{frames}.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (112, 112))
    assert writer.isOpened()
    for frame in array:
        writer.write(frame[:, :, ::-1].copy())
    writer.release()
    return "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()


def ask(server, url: str | None = None, settings: dict | None = None):
    parts = [{"type": "text", "text": "what is in the image?"}]
    if url is not None:
        parts.insert(0, {"type": "video_url", "video_url": {"url": url}})
    extra = {} if settings is None else {"mm_processor_kwargs": {"script": settings}}
    return server.client().chat.completions.create(
        model=server.model_dir,
        messages=[{"role": "user", "content": parts}],
        max_tokens=4,
        temperature=0,
        extra_body=extra,
    )


def test_offsets_past_8192_are_carried(qwen_server, tmp_path):
    # 12 frames -> 6 temporal steps of 2000 s * 2 tokens/s: offsets up to 10000
    answer = ask(qwen_server, video_url(tmp_path, 12))
    assert answer.choices[0].message.content is not None
    # the next request, a short video, is served
    assert ask(qwen_server, video_url(tmp_path, 4, fps=2.0)).choices[0].message.content
    assert qwen_server.alive()


@pytest.mark.parametrize("settings", [None, {"method": "none"}], ids=["pruned", "unpruned"])
def test_positions_past_the_rotary_table_get_a_400(qwen_server, tmp_path, settings):
    import openai

    # 36 frames: offsets past 32768, the tiny model's rotary table. Unpruned, vanilla vLLM
    # fails in the worker on this video (IndexError in the rotary embedding) and stops.
    url = video_url(tmp_path, 36)
    for _ in range(2):  # the same video again: the processor cache must not let it through
        with pytest.raises(openai.BadRequestError) as err:
            ask(qwen_server, url, settings)
        assert "rotary table" in str(err.value)
    # the next request, a short video, is served
    assert ask(qwen_server, video_url(tmp_path, 4, fps=2.0)).choices[0].message.content
    assert qwen_server.alive()
