"""Inference engine adapters used by workers (vLLM is imported only in ``vllm_engine``)."""
