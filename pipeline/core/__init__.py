"""What training and evaluation share: the model built from a config (``build``), its sealed,
weights-only checkpoints (``checkpointing``) and where they live (``storage``)."""
