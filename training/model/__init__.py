"""The model: the GPT layer list on megatron-core (gpt.py, attention.py), LSTM/GRU baselines (rnn.py),
initialization (init.py), LoRA (lora.py), FLOPs and the device table (flops.py), parameter names and q/k/v
grouping (names.py), and the per-config choice of all of these (parts.py). Imports core and parallelism."""
