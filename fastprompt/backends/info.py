"""What ``fastprompt info`` prints about backends: declarations, availability, dispatch settings,
probe results and measured choices. Describes; never builds, probes or times anything, and never
fails on a bad setting (it reports it)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fastprompt import _config
from fastprompt.backends import BACKENDS, FEATURES, NAMES, Backend, _dtype_names
from fastprompt.backends.cache import entries, path, versions_key

__all__ = ["describe", "lines"]


def _settings() -> list[str]:
    try:
        settings = _config.get()
    except ValueError as e:  # a malformed FASTPROMPT_* variable: say it, go on
        return [f"  settings: {e}"]
    out = []
    if settings.backend is None:
        out.append("  FASTPROMPT_BACKEND: not set (automatic choice)")
    elif settings.backend in NAMES:
        out.append(f"  FASTPROMPT_BACKEND: {settings.backend} (every call is forced to it)")
    else:
        out.append(
            f"  FASTPROMPT_BACKEND: {settings.backend!r} is not a backend (expected one of "
            f"{', '.join(NAMES)}); every prompt-attention call will raise until it is fixed"
        )
    out.append(
        f"  probe before first use: {settings.probe} (FASTPROMPT_PROBE; auto = on GPUs); "
        f"measured choice: {settings.measure} (FASTPROMPT_MEASURE; auto = on GPUs)"
    )
    out.append(f"  dispatch cache: {settings.dispatch_cache or 'in memory only'}")
    return out


def lines() -> list[str]:
    """The backend section of ``fastprompt info``, one printable line each."""
    out = ["backends (in order of preference):"]
    for row in describe():
        out += [
            f"  {row['backend']}: {row['summary']}",
            f"    measured: {row['measured']}",
            f"    devices {row['devices']}; dtypes {row['dtypes']}; head dims {row['head_dims']}",
            f"    features {row['features']}; lacks: {row['lacks']}",
            f"    chosen automatically: {row['auto']}; measured candidate: "
            f"{row['measured_candidate']}",
            f"    available here: {row['available']}",
        ]
    out += ["", "dispatch:", *_settings()]
    try:
        cache = path()
    except ValueError:  # a malformed setting, said by _settings above
        return out
    if cache is None:
        return out
    try:
        probes, measured = entries("probes"), entries("measured")
    except Exception as e:  # an unreadable cache must not stop `info`
        return [*out, f"  cannot read the dispatch cache: {type(e).__name__}: {e}"]
    out.append(f"  records for {versions_key()}:")
    if not probes and not measured:
        out.append("    none yet (probes and measurements run on a GPU's first calls)")
    for key, result in sorted(probes.items()):
        verdict = "passed" if result.get("ok") else "FAILED"
        out.append(f"    probe {key}: {verdict}: {result.get('detail')}")
    for key, decision in sorted(measured.items()):
        out.append(f"    measured {key}: {decision.get('backend')} (ms {decision.get('ms')})")
    return out


def describe(probe: object = None) -> list[dict[str, object]]:
    """Rows for ``fastprompt info``: each backend, what it declares, and whether it can run here.

    Never builds anything. ``probe`` (a callable of a :class:`Backend`, tests) replaces
    :meth:`Backend.status`.
    """
    rows = []
    for b in BACKENDS:
        try:
            why = probe(b) if callable(probe) else b.status()
        except ValueError as e:  # a malformed FASTPROMPT_* variable: describe, never fail
            why = f"cannot tell: {e}"
        auto, cand = _choice_entries(b, b.auto), _choice_entries(b, b.candidate)
        rows.append(
            {
                "backend": b.name,
                "summary": b.summary,
                "measured": b.measured,
                "devices": ",".join(b.devices),
                "dtypes": ",".join(_dtype_names(b.dtypes)),
                "head_dims": "any" if b.head_dims is None else ",".join(map(str, b.head_dims)),
                "features": ",".join(f for f in FEATURES if f in b.features),
                "lacks": "; ".join(f"{f}: {why}" for f, why in b.lacks.items()) or "-",
                "auto": auto or "never (explicit only)",
                "measured_candidate": cand or "-",
                "available": why or "yes",
            }
        )
    return rows


def _choice_entries(b: Backend, declared: Mapping[str, tuple[torch.dtype, ...]]) -> str:
    """``"cuda: float16/bfloat16 (head dims 32,64; sm_80, sm_90)"``: each device's dtypes with
    what narrows them there (the capabilities narrow CUDA only, never a CPU entry)."""
    entries = []
    for dev, dtypes in declared.items():
        narrow = []
        if b.auto_head_dims is not None:
            narrow.append(f"head dims {','.join(map(str, b.auto_head_dims))}")
        if b.auto_capabilities is not None and dev == "cuda":
            narrow.append(", ".join(f"sm_{x}{y}" for x, y in b.auto_capabilities))
        entries.append(
            f"{dev}: {'/'.join(_dtype_names(dtypes))}"
            + (f" ({'; '.join(narrow)})" if narrow else "")
        )
    return ", ".join(entries)
