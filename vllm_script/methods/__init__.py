"""Pruning methods: selection only (which tokens to keep), no vLLM imports."""
