"""Loading and saving models: the base model (an HF path or hub id, a GGUF file, the demo), LoRA and QLoRA, the
round checkpoints every stage reads, the local model cache (`python -m models.fetch NAME`) and the demo's
byte-level tokenizer. Imports only the shared modules of models/."""
