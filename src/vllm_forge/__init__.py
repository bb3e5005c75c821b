"""vllm-forge: build vLLM wheels that carry patches upstream has not released."""

__version__ = "0.1.0"
