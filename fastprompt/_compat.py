"""What differs between the torch versions fastprompt supports (torch >= 2.6)."""

from __future__ import annotations

import torch

__all__ = ["dynamo_lists_parameters_itself", "tracing"]


def tracing() -> bool:
    """Whether ``torch.compile`` or ``torch.export`` is tracing the code that asks.

    ``torch.compiler.is_exporting`` came in torch 2.7; before it, export traced through Dynamo,
    which ``is_compiling`` reports.
    """
    exporting = getattr(torch.compiler, "is_exporting", None)
    return torch.compiler.is_compiling() or (exporting is not None and exporting())


# A plain list as cache, as elsewhere: one entry once measured.
_LISTS_PARAMETERS: list[bool] = []


def dynamo_lists_parameters_itself() -> bool:
    """Whether Dynamo, on meeting a module in a trace, lists its parameters through the module's
    own ``named_parameters`` (an override included), running it eagerly before the forward.

    torch 2.6's Dynamo does (to mark every parameter static); later ones skip an overridden
    ``named_parameters``. A wrapper that agrees its entries with its model there
    (:class:`fastprompt.ownership.OwningWrapper`) then takes a replacement the model made (timm's
    ``reset_classifier``) before the compiled forward is traced, as an eager forward does, so the
    trace never meets it; elsewhere the trace meets it and refuses it. Measured once, by
    compiling a module of one parameter (backend ``eager``); never call it while tracing.
    """
    if not _LISTS_PARAMETERS:
        listed: list[bool] = []

        class _Listed(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.weight = torch.nn.Parameter(torch.zeros(1))

            def named_parameters(self, *args, **kwargs):
                listed.append(True)
                return super().named_parameters(*args, **kwargs)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return x + self.weight

        with torch.no_grad():
            torch.compile(_Listed(), backend="eager", fullgraph=True)(torch.zeros(1))
        _LISTS_PARAMETERS.append(bool(listed))
    return _LISTS_PARAMETERS[0]
