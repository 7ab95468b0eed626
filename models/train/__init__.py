"""The Train stage: DPO-family losses (losses.py), the round's trainer (trainer.py, FSDP in fsdp.py), and
supervised fine-tuning with the demo base it builds (sft.py). Imports models.load and the shared modules only:
training never generates or judges."""
