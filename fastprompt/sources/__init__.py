"""Prompt sources: where a prompted model's prompt tokens (and prompt keys/values) come from.

A source is a small ``nn.Module`` that owns its parameters and answers the prompted core
(:class:`fastprompt.prompted.PromptedViT`) per block (``docs/design.md`` §4, "Prompt sources"):

- :meth:`PromptSource.receives` / :meth:`PromptSource.count`: whether a new set of prompt tokens
  enters before the block (overwriting the prompt outputs of the block before, or joining the
  tokens when there are none), and how many tokens it holds;
- :meth:`PromptSource.tokens`: those tokens, (1, P, W) shared by the batch, (B, P, W) one set per
  image, or a table of T sets read through :meth:`PromptSource.selection`; W is the block's width
  (it may differ per block: the backbone adapter says which);
- :meth:`PromptSource.kv`: keys/values the block's queries attend to directly, joined after the
  qkv projection (key-value prompts; None for most sources);
- :meth:`PromptSource.shared` / :meth:`PromptSource.shared_kv`: the image-independent versions,
  computed once per model at inference.

Sources of learned per-block sets also expose them (:meth:`PromptSource.raw`,
:meth:`PromptSource.projection`, :meth:`PromptSource.prompt_parameters`) for methods that act on
individual prompts, such as Prompt Condensation. The core adopts a source's parameters under their
own names, so a method's state-dict keys are its official ones (``prompt_embeddings``, not
``source.prompt_embeddings``). Sources know no method and no backbone: a method's build function
creates one from the widths its backbone adapter reports.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, ClassVar

from torch import Tensor, nn

__all__ = ["POSITIONS", "DropoutConfigured", "PromptSource"]

# "prefix": after the class and register tokens, before the patches (VPT).
# "suffix": after the patches (PGN).
POSITIONS = ("prefix", "suffix")


def _prepare_inputs(prepare: Any) -> tuple[str, ...] | None:
    """The named parameters of a source's ``prepare`` after the images; None for ``**inputs``."""
    if prepare is PromptSource.prepare:
        return ()
    params = list(inspect.signature(prepare).parameters.values())[2:]  # self, images
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


# Per source class: every forward checks its keywords, and reading a signature costs more than
# the check (~15 us a call).
_PREPARE_INPUTS: dict[type, tuple[str, ...] | None] = {}


class PromptSource(nn.Module):
    """Base class of prompt sources.

    Attributes
    ----------
    position : {"prefix", "suffix"}
        Where the prompts are inserted, after the positional embedding (prompts get none).
    inputs : tuple of str, optional
        The forward inputs besides the images that :meth:`prepare` takes; None (the default):
        :meth:`forward_inputs` reads them from :meth:`prepare`'s signature.
    """

    position: ClassVar[str] = "prefix"
    inputs: ClassVar[tuple[str, ...] | None] = None

    # -- the schedule ---------------------------------------------------------------------------

    def receives(self, block: int) -> bool:
        """Whether a new prompt set enters before ``block`` (block 0 only, by default)."""
        return block == 0

    def count(self, block: int) -> int:
        """Prompt tokens in the set ``block`` receives (0 when it receives none)."""
        raise NotImplementedError

    # -- the prompts ----------------------------------------------------------------------------

    def forward_inputs(self) -> tuple[str, ...] | None:
        """The keywords a forward passes on to :meth:`prepare` (a mixed batch's ``task``), which
        the prompted model checks, refusing any other by name: :attr:`inputs` where the class
        declares them, else :meth:`prepare`'s named parameters after the images; None where
        ``prepare`` takes any keyword (``**inputs``), which it then checks itself."""
        if self.inputs is not None:
            return self.inputs
        cls = type(self)
        if cls not in _PREPARE_INPUTS:
            _PREPARE_INPUTS[cls] = _prepare_inputs(cls.prepare)
        return _PREPARE_INPUTS[cls]

    def prepare(self, images: Tensor, **inputs: Any) -> Any:
        """Per-forward state from the images (B, C, H, W) and any other forward inputs; None for
        most sources."""
        if inputs:
            raise TypeError(
                f"got an unexpected keyword argument {sorted(inputs)[0]!r}: "
                f"{type(self).__name__} takes no forward inputs besides the images"
            )
        return None

    def tokens(self, block: int, batch: int, state: Any) -> Tensor:
        """Prompt tokens entering ``block`` (T, P, W): T = 1 shared, T = B one set per image, or
        a table read through :meth:`selection`."""
        raise NotImplementedError

    def selection(self, block: int, batch: int, state: Any) -> tuple[Tensor | None, Tensor | None]:
        """``(prompt_index (B,), prompt_lengths (T,))`` of a table of sets that is neither shared
        nor one per image (tasks of a mixed batch); ``(None, None)`` otherwise."""
        return None, None

    def kv(self, block: int, batch: int, state: Any) -> tuple[Tensor, Tensor] | None:
        """Keys and values (T, H, N, d) the block's queries attend to besides its tokens', joined
        after the qkv projection and qk-norm (key-value prompts), or None."""
        return None

    def shared(self, block: int) -> Tensor | None:
        """The image-independent set of ``block`` (1, P, W) as used at inference, or None.

        A source whose prompts depend on the image returns None; then nothing can be computed
        once per model and cached.
        """
        return None

    def shared_kv(self, block: int) -> tuple[Tensor, Tensor] | None:
        """The image-independent :meth:`kv` of ``block`` as used at inference, or None."""
        return None

    def config(self) -> Any:
        """The configuration of the method that built the source, recorded in checkpoints.

        Sources hold it for the method (they do not read it)."""
        raise NotImplementedError

    # -- learned per-block sets (Prompt Condensation and other per-prompt methods) -------------

    def raw(self, block: int) -> Tensor:
        """The learned set ``block`` receives before projection (P, Dp); a view of a parameter,
        so writing into it writes the parameter."""
        raise TypeError(f"{type(self).__name__} holds no learned per-block prompt sets")

    def projection(self) -> nn.Module:
        """The map from :meth:`raw` sets to prompt tokens (Identity when there is none)."""
        return nn.Identity()

    def prompt_parameters(self) -> list[nn.Parameter]:
        """The parameters that hold the :meth:`raw` sets."""
        raise TypeError(f"{type(self).__name__} holds no learned per-block prompt sets")

    def distinct_sets(self) -> bool:
        """Whether every block that receives a set receives its own (not one shared by several
        blocks), so that a prompt of one block can be kept or dropped on its own."""
        return False


class DropoutConfigured(PromptSource):
    """A source that keeps its method's config (``self._config``, set by the subclass) and one
    prompt dropout module (``self.prompt_dropout``) whose rate the config records."""

    def config(self) -> Any:
        return self._config

    def set_dropout(self, p: float) -> None:
        """Change the prompt dropout, in the module and in the recorded config."""
        self.prompt_dropout.p = float(p)
        if dataclasses.is_dataclass(self._config):
            self._config = dataclasses.replace(self._config, dropout=float(p))
