"""The foundation every package stands on: the typed config schema (config.py), errors and exit codes
(errors.py), file primitives (files.py), the shared prompt-token encoding (prompt_tokens.py) and a free port
(net.py). Imports nothing of the project."""
