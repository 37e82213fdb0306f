"""Training: pretraining phases, SFT, DPO, scale-up init; one loop from one process to torchrun."""
