"""Methods (tier 4): one module per method, each ending with its :func:`register_peft_method`.

- :mod:`.vpt`: VPT (shallow and deep);
- :mod:`.vpt_ablation`: the official VPT ablations (deep prompts in the first or last k blocks,
  one set shared by every block);
- :mod:`.e2vpt`: E²VPT (visual and key-value prompts, token and segment pruning, rewinding);
- :mod:`.pgn`: Prompt Generation Networks (and the IIP baseline), with pixel deployment;
- :mod:`.condensation`: Prompt Condensation (scores, selection, the packed model).

The registry itself is :mod:`fastprompt.registry` (re-exported here); :mod:`.common` holds what
several methods share. Importing this package registers every built-in method.
"""

from fastprompt.methods import condensation, e2vpt, pgn, vpt, vpt_ablation
from fastprompt.registry import (
    CliOptions,
    Condensation,
    Method,
    get,
    names,
    register_peft_method,
    trainable,
)

__all__ = [
    "CliOptions",
    "Condensation",
    "Method",
    "condensation",
    "e2vpt",
    "get",
    "names",
    "pgn",
    "register_peft_method",
    "trainable",
    "vpt",
    "vpt_ablation",
]
