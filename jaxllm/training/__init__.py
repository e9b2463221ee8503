"""The functional training core: state, optimisers, pure steps, device strategies, the fit loop, checkpoints."""

from jaxllm.training.checkpoint import Checkpointer, CheckpointError
from jaxllm.training.loop import FitConfig, TrainingDiverged, fit
from jaxllm.training.optim import OptimizerConfig, make_optimizer, make_schedule
from jaxllm.training.parallel import STRATEGIES, Strategy, make_strategy
from jaxllm.training.state import TrainState
from jaxllm.training.step import evaluate, make_eval_step, make_train_step

__all__ = [
    "Checkpointer", "CheckpointError", "FitConfig", "OptimizerConfig", "STRATEGIES", "Strategy", "TrainState",
    "TrainingDiverged", "evaluate", "fit", "make_eval_step", "make_optimizer", "make_schedule",
    "make_strategy", "make_train_step",
]
