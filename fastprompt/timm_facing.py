"""What a prompted model answers of timm's model API (``docs/design.md`` §4, "The model stays
the user's").

Only what stays true of the wrapper is answered from the wrapped model: its configuration (data
config, class count, widths, token layout, the channels and reductions of its intermediates) and
its classifier, each only where the model has it (code that asks ``hasattr`` first sees the
wrapper as the model). ``global_pool`` is the wrapper's own: the pooling its readout does, in
timm's names. No method that runs the model is forwarded, since it would drop the prompts: timm's
feature extraction (``forward_intermediates``, ``get_intermediate_layers``) is the prompted
model's own (:mod:`fastprompt.intermediates`). A Swin's ``output_fmt`` is not answered either:
the wrapper's ``forward_features`` returns (B, tokens, C), not timm's NHWC map.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["TimmFacing"]

# timm's name of the pooling each readout does: the class token, or the mean of every token after
# the prefix tokens (the patches, and under "patches+prompts" the last block's prompts).
_POOLS = {"cls": "token", "patches": "avg", "patches+prompts": "avg"}


def _from_model(name: str, doc: str) -> property:
    """A read-only attribute of the wrapped model, absent (AttributeError) where it is."""

    def get(self: TimmFacing) -> Any:
        return getattr(self._model, name)

    return property(get, doc=doc)


class TimmFacing:
    """timm's model API on :class:`fastprompt.PromptedViT` (``_model``: the wrapped model,
    ``_check_live``/``_sync``: the ownership of :class:`~fastprompt.ownership.OwningWrapper`)."""

    _model: nn.Module
    _check_live: Callable[[], None]
    _sync: Callable[[], None]
    readout: str

    in_chans = _from_model("in_chans", "Channels of the input images.")
    embed_dim = _from_model("embed_dim", "Width of the tokens (a Swin: of its first stage).")
    num_prefix_tokens = _from_model(
        "num_prefix_tokens",
        """The model's class and register tokens (a ViT), in front of the patches: the model's
        own count, so that ``forward_features(x)[:, num_prefix_tokens:]`` is what the readout
        averages (``global_pool="avg"``): the patches, in timm's layout, under every readout but
        ``"patches+prompts"``, where the last block's prompt tokens come first (VPT) or last
        (PGN) among them, as the official avg-pool path averages them with the patches.""",
    )
    num_reg_tokens = _from_model("num_reg_tokens", "The model's register tokens (a ViT).")
    has_class_token = _from_model("has_class_token", "Whether the model has a class token.")
    no_embed_class = _from_model(
        "no_embed_class", "Whether the prefix tokens get no positional embedding (a ViT)."
    )
    pool_include_prefix = _from_model(
        "pool_include_prefix", "False: average pooling leaves the prefix tokens out (a ViT)."
    )
    dynamic_img_size = _from_model(
        "dynamic_img_size",
        "Whether images of other sizes than the model's are taken (the prompted forward too).",
    )
    num_layers = _from_model("num_layers", "The model's stages (a Swin).")

    @property
    def global_pool(self) -> str:
        """timm's name of the pooling ``forward_head`` does, which the readout decides (not the
        model's ``global_pool``, which ``reset_classifier(n, global_pool=...)`` may change):
        ``"token"`` under ``readout="cls"``, else ``"avg"``, the mean of ``forward_features``'
        tokens after :attr:`num_prefix_tokens`."""
        if not hasattr(self._model, "global_pool") or self.readout not in _POOLS:
            raise AttributeError("global_pool")  # as the model without one: absent
        return _POOLS[self.readout]

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
    def head_hidden_size(self) -> int:
        """Width of what ``forward_head(x, pre_logits=True)`` returns."""
        return self._model.head_hidden_size

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

    def set_input_size(self, *args: Any, **kwargs: Any) -> None:
        """timm's ``set_input_size`` of the wrapped model (image, patch or window size): what
        it replaces (a positional embedding, a Swin's attention masks) stays frozen, the
        prompts are unchanged."""
        self._check_live()
        before = {name: p.requires_grad for name, p in self._model.named_parameters()}
        self._model.set_input_size(*args, **kwargs)
        self._sync()
        # Older timm (1.0.9) rebuilt a Swin's bias tables as new parameters that train: each
        # takes the trainability of the entry it replaced (a new name joins the frozen backbone).
        for name, p in self._model.named_parameters():
            if p.requires_grad and not before.get(name, False):
                p.requires_grad_(False)

    # Properties giving the wrapped model's own methods, so that a model without them (a family
    # of one's own) leaves the wrapper without them too: timm's optimizer factory asks
    # ``hasattr``/``getattr(..., default)`` first and falls back, where a method of the wrapper
    # would raise AttributeError from inside.
    @property
    def no_weight_decay(self) -> Callable[[], set[str]]:
        """The wrapped model's ``no_weight_decay()``: the parameters that timm's optimizer
        factory keeps free of weight decay (its positional embedding, class token, ...; the
        names are the wrapper's too). Prompts decay as every other weight, as in the official
        VPT solver."""
        return self._model.no_weight_decay

    @property
    def group_matcher(self) -> Callable[..., Any]:
        """The wrapped model's ``group_matcher(coarse=False)``: its parameter groups, which
        timm's layer-wise learning-rate decay (``create_optimizer_v2(..., layer_decay=...)``)
        reads. The prompts match none of them, so timm puts them in the last group with the
        head, at the full learning rate: like the head they are new, not pretrained layers (the
        official VPT trains both at one rate)."""
        return self._model.group_matcher
