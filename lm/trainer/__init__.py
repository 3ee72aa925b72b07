"""Training: the step (`step.py`), the Trainer that compiles and places it (`core.py`), and the
loop in reusable pieces (`loop.py`).

A stage supplies `loss_fn(trainable, frozen, batch, rng) -> (loss, metrics)`, an optax optimizer
and its data. The trainer owns the rest: the jitted, sharded, donated step with gradient
accumulation and a skip of non-finite updates; evaluation; metrics to the console, TensorBoard and
a JSONL file; Orbax checkpoints of everything needed to resume exactly; and a clean save-and-exit
on SIGTERM (TPU preemption).
"""

from lm.trainer.core import TrainConfig, Trainer, check_workdir_writable
from lm.trainer.loop import DataIterator, NonFiniteLossError, Session, Stateful, run
from lm.trainer.step import LossFn, TrainState, make_train_step

__all__ = ["DataIterator", "LossFn", "NonFiniteLossError", "Session", "Stateful", "TrainConfig",
           "TrainState", "Trainer", "check_workdir_writable", "make_train_step", "run"]
