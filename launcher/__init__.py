"""Shardforge's front door: the ``shardforge`` CLI, process spawning and Slurm.

``launcher.config`` and ``launcher.errors`` are leaf modules (they import nothing from the project);
every other package may import them. This ``__init__`` imports nothing, so importing them stays cheap.
"""
