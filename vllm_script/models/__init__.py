"""vLLM model and processor subclasses, one file per architecture."""
