"""Triton kernels (installed as `vllm_script.kernels`).

Their pure-PyTorch twins (the CPU path and the oracles) live in `vllm_script.reference`.
Importing a submodule needs `triton`; `vllm_script.ops` loads them lazily.
"""
