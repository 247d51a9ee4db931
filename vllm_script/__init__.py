"""vllm-script: visual-token pruning for vLLM (Script, and peers).

Kept import-light on purpose: vLLM's plugin loader imports this package in every
process, so neither vLLM nor Triton is imported here.
"""

__version__ = "0.1.0"
