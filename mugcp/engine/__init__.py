"""Training, evaluation and checkpoints."""
from mugcp.engine.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from mugcp.engine.evaluation import evaluate, evaluate_subsets, harmonic_mean
from mugcp.engine.trainer import TrainingDiverged, train

__all__ = ["CheckpointError", "TrainingDiverged", "evaluate", "evaluate_subsets", "harmonic_mean", "read_checkpoint", "save_checkpoint", "train"]
