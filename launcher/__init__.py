"""Shardforge's front door: the ``shardforge`` CLI, local rank spawning, Slurm scripts and submission, the planner,
quickstart, fine-tune and maintenance commands. Nothing else imports it; it imports every package. This
``__init__`` imports nothing, so ``shardforge --help`` stays cheap.
"""
