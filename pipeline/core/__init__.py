"""What training and evaluation share: the model built from a config (``build``) and its sealed,
weights-only checkpoints (``checkpointing``)."""
