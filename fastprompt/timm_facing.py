"""What a prompted model answers of timm's model API (``docs/design.md`` §4, "The model stays
the user's").

Only what stays true of the wrapper is answered from the wrapped model: its configuration (data
config, class count, feature width, the channels and reductions of its intermediates) and its
classifier. No method that runs the model is forwarded, since it would drop the prompts: timm's
feature extraction (``forward_intermediates``, ``get_intermediate_layers``) is the prompted
model's own (:mod:`fastprompt.intermediates`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["TimmFacing"]


class TimmFacing:
    """timm's model API on :class:`fastprompt.PromptedViT` (``_model``: the wrapped model,
    ``_check_live``/``_sync``: the ownership of :class:`~fastprompt.ownership.OwningWrapper`)."""

    _model: nn.Module
    _check_live: Callable[[], None]
    _sync: Callable[[], None]

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """The wrapped model's pretrained config (what ``timm.data.resolve_data_config(
        model=...)`` reads: input size, mean, std, crop)."""
        return self._model.pretrained_cfg

    @property
    def default_cfg(self) -> dict[str, Any]:
        """timm's older name of :attr:`pretrained_cfg`."""
        return self._model.pretrained_cfg

    @property
    def num_classes(self) -> int:
        """Outputs of the classifier (0 without one)."""
        return self._model.num_classes

    @property
    def num_features(self) -> int:
        """Width of the features the classifier reads."""
        return self._model.num_features

    @property
    def feature_info(self) -> Any:
        """The wrapped model's ``feature_info``: channels, reduction and module of each
        intermediate of ``forward_intermediates`` (what timm's ``FeatureGetterNet`` reads)."""
        return self._model.feature_info

    def get_classifier(self) -> nn.Module:
        """The classifier the forward runs (the wrapped model's, which this wrapper owns)."""
        self._sync()
        return self._model.get_classifier()

    def reset_classifier(self, num_classes: int, *args: Any, **kwargs: Any) -> None:
        """timm's ``reset_classifier`` of the wrapped model: a new head of ``num_classes``
        outputs in timm's initialisation (not the method's ``head_init``), which trains. Its
        pooling arguments pass through; the readout stays the one the wrapper was built with."""
        self._check_live()
        self._model.reset_classifier(num_classes, *args, **kwargs)
        self._sync()
