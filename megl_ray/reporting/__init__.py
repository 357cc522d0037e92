"""What a run shows and keeps for people: console and logging, live progress, experiment tracking (TensorBoard,
MLflow, W&B), training curves and the explanation gallery."""
