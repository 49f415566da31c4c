"""Training: the loop, safe checkpoints, metrics, continual learning."""
