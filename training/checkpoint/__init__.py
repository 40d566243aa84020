"""Checkpoints: the manager (when and how, manager.py), the folder format and its verification (format.py),
the layout-independent model and optimizer state (canonical.py), the weights reader (reader.py) and the
inspect/consolidate tools (tools.py). Imports core, parallelism and training.model."""
