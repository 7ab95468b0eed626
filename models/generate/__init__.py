"""The Generate stage: K samples per prompt from the round's generator (generation.py), through transformers'
generate (sampling.py), our static-KV-cache loop or vLLM (fast_generation.py). Imports models.load and the
shared modules only."""
