"""Model definitions, the trainer, checkpoints, evaluation and export (see README: Architecture)."""
