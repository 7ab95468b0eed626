"""The Generate stage: K samples per prompt from the round's generator (generation.py), through transformers'
generate (sampling.py), our static-KV-cache loop (fast_generation.py) or vLLM (vllm_engine.py). Imports models.load and the
shared modules only."""
