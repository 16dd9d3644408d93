from klora.training.arguments import (add_training_arguments, check_training_arguments,
                                      exit_code, lora_config, lora_targets)
from klora.training.checkpoint import ResumableTraining
from klora.training.evaluation import EpochEvaluation
from klora.training.fine_tune import fine_tune
from klora.training.optimizer import adamw_with_warmup
from klora.training.plot import plot_confusion, plot_history
from klora.training.step_history import StepHistory, StepLoss
from klora.training.task_model import check_max_length, load_task_model, quantize_backbone
