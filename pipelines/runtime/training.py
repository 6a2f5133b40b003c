"""Ray Train runs that Ctrl-C stops like the rest of binllm."""

from __future__ import annotations

from typing import Any

import ray
from ray.train.torch import TorchTrainer


class InterruptibleTrainer(TorchTrainer):
    """A ``TorchTrainer`` that leaves Ctrl-C to Python.

    Ray Train installs its own SIGINT handler in ``fit`` and never removes it: the first Ctrl-C
    aborts the training run and ``fit`` returns or fails like any run, and later in the process
    (a stage after training) Ctrl-C is swallowed or exits with code 0 (``sys.exit`` in the
    handler). Here Ctrl-C raises ``KeyboardInterrupt`` wherever the driver is; during ``fit``
    the run's controller is killed first (its workers with it), so that nothing trains on in a
    process that lives on (a notebook), and the stage never publishes its new version."""

    _controller: Any = None

    def _register_sigint_handler(self, controller: Any) -> None:
        self._controller = controller

    def fit(self) -> Any:
        try:
            return super().fit()
        except KeyboardInterrupt:
            if self._controller is not None:
                ray.kill(self._controller)
            raise
