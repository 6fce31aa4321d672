"""What ``fastprompt info`` prints about backends: declarations, availability, dispatch settings,
probe results and measured choices. Describes; never builds, probes or times anything, and never
fails on a bad setting (it reports it)."""

from __future__ import annotations

from fastprompt import _config
from fastprompt.backends import NAMES, describe
from fastprompt.backends.cache import entries, path, versions_key

__all__ = ["lines"]


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
