"""The Ray Train override that keeps Ctrl-C Python's: it must still override something."""

from __future__ import annotations

import inspect

from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

from pipelines.runtime.training import InterruptibleTrainer


def test_ray_train_still_installs_its_sigint_handler_through_the_overridden_method() -> None:
    # A Ray upgrade that renamed the method would make the override a silent no-op.
    assert issubclass(InterruptibleTrainer, DataParallelTrainer)
    assert "_register_sigint_handler" in vars(DataParallelTrainer)
    assert "self._register_sigint_handler(" in inspect.getsource(DataParallelTrainer)
