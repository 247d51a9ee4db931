"""Run requests in a fresh engine (a separate process); see engine_utils.run_in_fresh_engine."""

import json
import sys

sys.path.insert(0, __file__.rsplit("/", 1)[0])

from engine_utils import ENGINE_KWARGS, run_requests  # noqa: E402

if __name__ == "__main__":
    from vllm import LLM

    spec = json.loads(sys.stdin.read())
    llm = LLM(model=spec["model"], **{**ENGINE_KWARGS, **spec["engine_kwargs"]})
    results = run_requests(llm, spec["requests"])
    print("ENGINE_RUNNER_RESULT " + json.dumps(results), flush=True)
