"""A PyTorch Lightning callback that logs the statistics of clipped optimizers (ClippedSGD,
ClippedAdamW, ClippedSSTM) every N optimizer steps (one device-to-host transfer each time) and warns when the Trainer's own gradient clipping
(``gradient_clip_val``) would run before ours.

    from torch_clip_fused.integrations.lightning import ClipStatisticsCallback
    trainer = lightning.pytorch.Trainer(callbacks=[ClipStatisticsCallback(every_n_steps=50)])

Works with ``lightning`` (``lightning.pytorch``) and with the standalone ``pytorch_lightning``
package: the callback derives from the ``Callback`` class of whichever of the two is already
imported (both when both are), else of ``lightning.pytorch``, else of ``pytorch_lightning``.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from typing import Dict, List

from . import (CLIPPED_OPTIMIZERS, find_clipped_optimizer, flatten_statistics, statistics_and_vector_to_floats,
               warn_outer_clipping)
from .tensor_norms import check_options, tensor_norm_request


def _callback_bases() -> tuple:
    loaded = [name for name in ("lightning.pytorch", "pytorch_lightning") if sys.modules.get(name) is not None]
    if not loaded:
        for name in ("lightning.pytorch", "pytorch_lightning"):
            try:
                importlib.import_module(name)
            except ImportError:
                continue
            loaded = [name]
            break
    if not loaded:
        raise ImportError(
            "torch_clip_fused.integrations.lightning needs PyTorch Lightning, which is not installed: "
            "pip install lightning"
        )
    return tuple(sys.modules[name].Callback for name in loaded)


class _ClipStatisticsLogic:
    """The framework-independent part of :class:`ClipStatisticsCallback`."""

    def __init__(self, every_n_steps: int = 50, prefix: str = "clip/", warn_on_trainer_clipping: bool = True,
                 top_k_tensor_norms: int = 0, all_tensor_norms: bool = False):
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an int >= 1, got {every_n_steps!r}")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        check_options(top_k_tensor_norms, all_tensor_norms)
        super().__init__()
        self.top_k_tensor_norms = top_k_tensor_norms
        self.all_tensor_norms = all_tensor_norms
        self.every_n_steps = every_n_steps
        self.prefix = prefix
        self.warn_on_trainer_clipping = warn_on_trainer_clipping
        #: every record logged so far: ``{"step": global_step, "clip/norm": ..., ...}``
        self.history: List[Dict[str, float]] = []
        self._warned = False
        self._warned_none = False
        self._last_step = None

    @staticmethod
    def _clipped_optimizers(trainer) -> list:
        found = []
        for opt in getattr(trainer, "optimizers", None) or []:
            inner = find_clipped_optimizer(opt)
            if inner is not None:
                found.append(inner)
        return found

    def _check_trainer_clipping(self, trainer, pl_module) -> None:
        if self._warned or not self.warn_on_trainer_clipping:
            return
        clip_val = getattr(trainer, "gradient_clip_val", None)
        if clip_val is None or clip_val <= 0 or not getattr(pl_module, "automatic_optimization", True):
            return  # Lightning clips only with gradient_clip_val > 0 under automatic optimization
        optimizers = self._clipped_optimizers(trainer)
        if optimizers:
            self._warned = True
            algorithm = getattr(trainer, "gradient_clip_algorithm", None)
            algorithm = getattr(algorithm, "value", algorithm)
            warn_outer_clipping(
                f"Trainer(gradient_clip_val={clip_val!r}" + (f", gradient_clip_algorithm={algorithm!r})" if algorithm else ")"),
                optimizers[0],
                "Pass gradient_clip_val=None (the default) and let the clipped optimizer clip.",
                stacklevel=3,
            )

    def on_fit_start(self, trainer, pl_module) -> None:
        self._check_trainer_clipping(trainer, pl_module)

    def on_train_start(self, trainer, pl_module) -> None:
        # optimizers are set up by now under every strategy
        self._check_trainer_clipping(trainer, pl_module)
        if not self._clipped_optimizers(trainer) and not self._warned_none:
            self._warned_none = True
            names = [type(o).__name__ for o in getattr(trainer, "optimizers", None) or []]
            warnings.warn(
                f"ClipStatisticsCallback: no clipped optimizer ({CLIPPED_OPTIMIZERS}) among the Trainer's "
                f"optimizers {names}; it will log nothing",
                UserWarning,
                stacklevel=2,
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # counts optimizer steps (not batches under accumulation)
        if step == self._last_step or step == 0 or step % self.every_n_steps != 0:
            return
        self._last_step = step
        optimizers = self._clipped_optimizers(trainer)
        if not optimizers:
            return
        # one stack and one transfer over every group of every clipped optimizer (and its per-tensor norms)
        stats = [s for opt in optimizers for s in opt.statistics()]
        prefixes = [self.prefix if len(optimizers) == 1 else f"{self.prefix}opt{j}/" for j in range(len(optimizers))]
        request = tensor_norm_request([(prefix, opt.tensor_statistics()) for prefix, opt in zip(prefixes, optimizers)],
                                      self.top_k_tensor_norms, self.all_tensor_norms)
        floats, extra = statistics_and_vector_to_floats(stats, None if request is None else request.vector)
        record: Dict[str, float] = {}
        start = 0
        for opt, prefix in zip(optimizers, prefixes):
            n = len(opt.param_groups)
            record.update(flatten_statistics(floats[start : start + n], prefix))
            start += n
        if request is not None:
            record.update(request.decode(extra))
        if not record:
            return
        self.history.append({"step": step, **record})
        for logger in getattr(trainer, "loggers", None) or []:
            logger.log_metrics(record, step=step)


def _make_callback_class():
    bases = _callback_bases()

    class ClipStatisticsCallback(_ClipStatisticsLogic, *bases):
        """Logs the statistics of clipped optimizers (ClippedSGD, ClippedAdamW, ClippedSSTM) every
        ``every_n_steps`` optimizer steps.

        Every ``every_n_steps`` optimizer steps (``trainer.global_step``), the statistics of every
        clipped optimizer of the Trainer are read back with one transfer and written to each of
        the Trainer's loggers (``logger.log_metrics(..., step=global_step)``, independent of
        ``log_every_n_steps``), keys ``{prefix}norm``, ``{prefix}threshold``,
        ``{prefix}clipped_fraction``, ``{prefix}skipped``, ``{prefix}skipped_steps``,
        ``{prefix}step`` (``{prefix}group{i}/...`` with several param groups,
        ``{prefix}opt{j}/...`` with several clipped optimizers).  They are also kept in
        ``self.history``.

        ``top_k_tensor_norms`` = k > 0 adds, in the same transfer, the k largest per-tensor pre-clip
        norms of the step (``optimizer.tensor_statistics()``) as ``{prefix}tensor_norm/{name}`` with
        ``{prefix}tensor_scale/{name}``; ``all_tensor_norms=True`` every tensor's.

        At the start of fit it warns once (:class:`OuterClippingWarning`) when the Trainer's own
        clipping (``gradient_clip_val`` > 0) would clip the gradients before a clipped
        optimizer sees them.
        """

    ClipStatisticsCallback.__module__ = __name__
    ClipStatisticsCallback.__qualname__ = "ClipStatisticsCallback"  # Lightning's state_key, pickling
    return ClipStatisticsCallback


ClipStatisticsCallback = _make_callback_class()

__all__ = ["ClipStatisticsCallback"]
