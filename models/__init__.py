"""Everything that touches a model, with no Luigi in it, one subpackage per stage of a round (the task that
calls it in brackets), and beside them what several stages share:

    load/      the base model, LoRA and QLoRA, round checkpoints, GGUF files, the model cache   (BaseModel; every stage)
    generate/  sampling the round's responses: transformers, the static-cache loop, vLLM         (Generate)
    judge/     judges, PairRM, verifiers, pairing, self-training's example selection              (Judge)
    train/     losses, the trainer, FSDP, supervised fine-tuning and the demo base               (Train, BaseModel)
    evaluate/  held-out evaluation, its referee, validation scoring, lm-eval benchmarks           (Evaluate, Validate, Benchmark)
    logps.py, padding.py, packing.py   log-probs of token sequences, padding, packed linears: shared

A stage imports the shared modules and the stages it builds on, never one beside or after it:
load <- generate <- judge <- evaluate, and load <- train (tests/test_imports.py holds this).
"""
