"""A Hugging Face ``transformers.TrainerCallback`` that logs the statistics of clipped optimizers (ClippedSGD, ClippedAdamW, ClippedSSTM)
(one device-to-host transfer each time) and warns when the Trainer's own gradient clipping
(``TrainingArguments.max_grad_norm``, 1.0 by default) would run before ours.

    from torch_clip_fused.integrations.huggingface import ClipStatisticsCallback
    trainer = Trainer(model=model, args=TrainingArguments(..., max_grad_norm=0), optimizers=(opt, None), ...)
    ClipStatisticsCallback.attach(trainer)          # or Trainer(..., callbacks=[ClipStatisticsCallback()])
"""

from __future__ import annotations

import warnings
from typing import Dict, List, Optional

from . import CLIPPED_OPTIMIZERS, find_clipped_optimizer, flat_statistics, require, warn_outer_clipping
from .tensor_norms import check_options

_transformers = require("transformers", "transformers accelerate")
TrainerCallback = _transformers.TrainerCallback
DefaultFlowCallback = _transformers.DefaultFlowCallback

#: prefixes of the keys of the Trainer's evaluation / prediction logs
_NOT_TRAINING = ("eval_", "test_", "predict_")


class ClipStatisticsCallback(TrainerCallback):
    """Adds the statistics of clipped optimizers (ClippedSGD, ClippedAdamW, ClippedSSTM) to the Trainer's logs.

    Args:
        every_n_steps: None (default) adds them to every training log of the Trainer (its
            ``logging_steps`` / ``logging_strategy``); an int N makes the Trainer log at every N-th
            optimizer step (``control.should_log``) and adds them there only.
        prefix: key prefix: ``clip/norm``, ``clip/threshold``, ``clip/clipped_fraction``,
            ``clip/skipped``, ``clip/skipped_steps``, ``clip/step`` (``clip/group{i}/...`` with
            several param groups).
        optimizer: the optimizer to read; by default the one the Trainer hands its callbacks
            (an optimizer passed as ``Trainer(optimizers=(opt, None))``) or, after
            :meth:`attach`, ``trainer.optimizer`` (also one the Trainer created itself).
        warn_on_trainer_clipping: warn once (:class:`~torch_clip_fused.integrations.OuterClippingWarning`)
            when ``args.max_grad_norm > 0`` while the optimizer is a clipped optimizer (ClippedSGD, ClippedAdamW, ClippedSSTM):
            the Trainer then clips first and makes our clipping inert.
        top_k_tensor_norms: k > 0 adds the k largest per-tensor pre-clip norms of the step
            (``optimizer.tensor_statistics()``) as ``clip/tensor_norm/{name}`` with
            ``clip/tensor_scale/{name}``, in the same transfer; 0 (default) none.
        all_tensor_norms: every tensor's norm and scale instead (same keys, same transfer).

    Each time, every group's statistics are read with one transfer and added to the ``logs``
    dict of ``on_log``, to the entry of ``trainer.state.log_history`` (hence
    ``trainer_state.json``) and to ``self.history``.  Callbacks run in order and the Trainer
    puts its ``report_to`` integrations (TensorBoard, W&B...) before the ones passed as
    ``callbacks=``: use :meth:`attach` so that they see the statistics too.
    """

    def __init__(
        self,
        every_n_steps: Optional[int] = None,
        prefix: str = "clip/",
        optimizer=None,
        warn_on_trainer_clipping: bool = True,
        top_k_tensor_norms: int = 0,
        all_tensor_norms: bool = False,
    ):
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1):
            raise ValueError(f"every_n_steps must be None or an int >= 1, got {every_n_steps!r}")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        check_options(top_k_tensor_norms, all_tensor_norms)
        self.top_k_tensor_norms = top_k_tensor_norms
        self.all_tensor_norms = all_tensor_norms
        self.every_n_steps = every_n_steps
        self.prefix = prefix
        self.optimizer = optimizer
        self.warn_on_trainer_clipping = warn_on_trainer_clipping
        #: every record added so far: ``{"step": global_step, "clip/norm": ..., ...}``
        self.history: List[Dict[str, float]] = []
        self._trainer = None
        self._warned = False
        self._warned_none = False
        self._last_step = None

    @classmethod
    def attach(cls, trainer, **kwargs) -> "ClipStatisticsCallback":
        """Create the callback and put it right after the Trainer's ``DefaultFlowCallback``, before
        its ``report_to`` integrations, so that they log the statistics too; it also reads
        ``trainer.optimizer`` (so an optimizer the Trainer creates itself is found).  Returns it."""
        callback = cls(**kwargs)
        callback._trainer = trainer
        callbacks = trainer.callback_handler.callbacks
        position = next((i + 1 for i, cb in enumerate(callbacks) if isinstance(cb, DefaultFlowCallback)), 0)
        callbacks.insert(position, callback)
        return callback

    def _clipped(self, optimizer):
        for candidate in (self.optimizer, getattr(self._trainer, "optimizer", None), optimizer):
            if candidate is not None:
                inner = find_clipped_optimizer(candidate)
                if inner is not None:
                    return inner
        return None

    def _check(self, args, optimizer) -> None:
        clipped = self._clipped(optimizer)
        if clipped is None or self._warned or not self.warn_on_trainer_clipping:
            return
        max_grad_norm = getattr(args, "max_grad_norm", None)
        if max_grad_norm is not None and max_grad_norm > 0:  # the Trainer clips iff max_grad_norm > 0
            self._warned = True
            warn_outer_clipping(
                f"TrainingArguments(max_grad_norm={max_grad_norm!r}) (the Trainer's default is 1.0)",
                clipped,
                "Pass TrainingArguments(max_grad_norm=0) and let the clipped optimizer clip.",
                stacklevel=3,
            )

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self._check(args, optimizer)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self._check(args, optimizer)  # an optimizer the Trainer created exists by now
        if self.every_n_steps is not None and state.global_step % self.every_n_steps == 0:
            control.should_log = True
        return control

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        step = state.global_step
        if logs is None or step == 0 or step == self._last_step:
            return
        if "train_loss" in logs or any(key.startswith(_NOT_TRAINING) for key in logs):
            return  # the end-of-training summary, or an evaluation
        if self.every_n_steps is not None and step % self.every_n_steps != 0:
            return
        clipped = self._clipped(optimizer)
        if clipped is None:
            if not self._warned_none:
                self._warned_none = True
                warnings.warn(
                    f"ClipStatisticsCallback: the Trainer's optimizer is not a clipped optimizer ({CLIPPED_OPTIMIZERS}) "
                    "(pass it as Trainer(optimizers=(opt, None)), or use ClipStatisticsCallback.attach(trainer)); "
                    "it logs nothing",
                    UserWarning,
                    stacklevel=2,
                )
            return
        self._last_step = step
        record = flat_statistics(clipped, self.prefix, self.top_k_tensor_norms,
                                 self.all_tensor_norms)  # one device-to-host transfer
        if not record:
            return
        logs.update(record)
        history = state.log_history
        if history and history[-1].get("step") == step and all(history[-1].get(k) == v for k, v in logs.items() if k not in record):
            history[-1].update(record)  # Trainer.log appended a copy of logs just before on_log
        else:
            history.append({**record, "step": step})
        self.history.append({"step": step, **record})


__all__ = ["ClipStatisticsCallback"]
