"""Triton kernels (installed as vllm_script.kernels); PyTorch twins live in vllm_script.reference."""
