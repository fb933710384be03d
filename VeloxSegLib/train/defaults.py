"""Fine-tuning defaults, importable without torch (the CLI parser reads them)."""
FINETUNE_EPOCHS = 20
FINETUNE_ITERATIONS = 25
FINETUNE_LR = 1e-4
