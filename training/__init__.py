"""Training: the loop (trainer.py), its callbacks (callbacks.py: log line, TensorBoard, validation,
checkpointing, heartbeat), per-rank cluster metrics and goodput (cluster_metrics.py), the heartbeat a rank gives its
supervisor and preemption signals (preemption.py), optimizer and schedule (optim.py); then the rooms
model/, checkpoint/, hf/ and inference/. The loop may import every room before it; see README: Architecture."""
