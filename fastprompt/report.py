"""Turn a ``fastprompt bench`` result into tables and plots a person can paste into a paper."""

from __future__ import annotations

import os
from typing import Any

from fastprompt._warnings import warn_at_caller

__all__ = ["compare_table", "markdown_table", "plot", "print_table"]

_COLUMNS = (
    ("prompts", "prompts"),
    ("variant", "variant"),
    ("infer ms", "infer"),
    ("img/s", "ips"),
    ("infer vs naive", "infer_vs_naive"),
    ("infer vs free", "infer_vs_free"),
    ("train ms", "train"),
    ("train vs naive", "train_vs_naive"),
    ("train vs free", "train_vs_free"),
    ("train vs frozen", "train_vs_frozen"),
    ("act. MiB", "activation_bytes"),
    ("mem vs naive", "memory_vs_naive"),
    ("mem vs free", "memory_vs_free"),
    ("peak MiB", "peak_bytes"),
    ("peak vs free", "peak_vs_free"),
    ("RSS rise MiB", "peak_rss_bytes"),
    ("GFLOPs/img", "gflops"),
)


def _cell(row: dict[str, Any], key: str, batch: int) -> str:
    if key in ("infer", "train"):
        if key not in row:
            return "-"
        s = row[key]
        return f"{1e3 * s['median_s']:.1f} [{1e3 * s['p20_s']:.1f}, {1e3 * s['p80_s']:.1f}]"
    if key == "ips":
        return f"{batch / row['infer']['median_s']:.1f}" if "infer" in row else "-"
    if key in ("activation_bytes", "peak_bytes", "peak_rss_bytes"):
        return f"{row[key] / 2**20:.1f}" if row.get(key) is not None else "-"
    if key == "gflops":
        return f"{row[key] / batch:.2f}" if key in row else "-"
    value = row.get(key)
    if value is None:
        return "-"
    # A timing ratio ("<kind>_vs_<ref>") with the p20–p80 of its per-repetition ratios, which
    # older reports (and memory ratios) lack.
    kind, _, ref = key.partition("_vs_")
    spread = row.get(f"{kind}_paired", {}).get(ref)
    if spread is not None:
        return f"{value:.3f} ({spread['p20']:.2f}–{spread['p80']:.2f})"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _rows(result: dict[str, Any]) -> list[list[str]]:
    batch = result["config"]["batch"]
    return [[_cell(r, key, batch) for _, key in _COLUMNS] for r in result["rows"]]


def _timm_attention(env: dict[str, Any]) -> str:
    fused = env.get("timm_fused_attn")  # absent from reports before it was recorded
    if fused is None:
        return ""
    said = {True: "fused", False: "written out"}
    return f" (attention {said[fused['stable']]}, experimental {said[fused['experimental']]})"


# What ``fastprompt bench`` writes into its --out folder, beside report.json and report.md.
FIGURES = ("latency.png", "train_latency.png", "gflops.png", "memory.png", "peak_memory.png")


def _allocator(env: dict[str, Any]) -> str:
    alloc = env.get("cpu_allocator")  # absent from reports before it was recorded
    if env.get("device_type") != "cpu" or alloc is None:
        return ""
    said = (
        "glibc's default" if alloc == "default" else ", ".join(f"{k}={v}" for k, v in alloc.items())
    )
    return f", CPU allocator {said}"


def _image_size(cfg: dict[str, Any]) -> str:
    size = cfg.get("image_size")  # absent from reports before it was recorded
    return "" if size is None else f", images {'x'.join(map(str, size))}"


def _header(result: dict[str, Any]) -> str:
    env, cfg = result["env"], result["config"]
    return (
        f"{cfg['model']} ({'deep' if cfg['deep'] else 'shallow'} VPT), batch {cfg['batch']}"
        f"{_image_size(cfg)}, {cfg['dtype']}, backend {cfg.get('backend') or 'automatic'}, "
        f"on {env['device']}; torch {env['torch']}, triton {env['triton']}, "
        f"timm {env['timm']}{_timm_attention(env)}{_allocator(env)}, "
        f"fastprompt {env['fastprompt']} ({env['commit']}), {env['date']}. "
        "Times: median [p20, p80]; ratios (\"x vs y\": this row's figure over y's, below 1 "
        "less) against naive VPT and the prompt-free model of the "
        "same run (its training step: full fine-tuning's backward; frozen: its step with the "
        "backbone frozen and the gradient taken to the images, a prompt method's floor), the "
        "ratio of the medians followed by the p20–p80 of the ratios taken repetition by "
        "repetition (each repetition times the variants back to back). "
        "fused+<policy>: fastprompt "
        "under a memory policy. act.: bytes saved for backward; peak: a training step's rise "
        f"in {_peak_of(result)} (gradients included, no optimiser); RSS rise: the process's "
        "resident memory (CPU). GFLOPs/img: fvcore's count of an inference forward (one "
        "multiply-add is one flop), fastprompt's with its prompt keys/values computed once "
        "per model, not per image."
    )


def _peak_of(result: dict[str, Any]) -> str:
    return next((r["peak_of"] for r in result["rows"] if r.get("peak_of")), "memory")


def markdown_table(result: dict[str, Any]) -> str:
    """The report as a Markdown table with a one-line header naming device and versions."""
    names = [name for name, _ in _COLUMNS]
    lines = [_header(result), "", "| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    lines += ["| " + " | ".join(r) + " |" for r in _rows(result)]
    return "\n".join(lines)


def print_table(result: dict[str, Any]) -> None:
    """The report as a fixed-width table on stdout."""
    names = [name for name, _ in _COLUMNS]
    rows = _rows(result)
    widths = [max(len(n), *(len(r[i]) for r in rows)) for i, n in enumerate(names)]
    print(_header(result))
    print("  ".join(n.rjust(w) for n, w in zip(names, widths)))
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


def compare_table(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Two reports side by side (Markdown): median inference/training times and their ratio."""

    def index(result):
        return {(r["prompts"], r["variant"]): r for r in result["rows"]}

    a, b = index(old), index(new)
    lines = [
        f"Compared: A = {old['env']['device']} ({old['env']['date']}), "
        f"B = {new['env']['device']} ({new['env']['date']})"
        + _config_differences(old.get("config", {}), new.get("config", {})),
        "",
        "| prompts | variant | infer ms A | infer ms B | B/A | train ms A | train ms B | B/A |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(set(a) & set(b)):
        cells = [str(key[0]), key[1]]
        for kind in ("infer", "train"):
            if kind in a[key] and kind in b[key]:
                ta, tb = a[key][kind]["median_s"], b[key][kind]["median_s"]
                cells += [f"{1e3 * ta:.1f}", f"{1e3 * tb:.1f}", f"{tb / ta:.2f}"]
            else:
                cells += ["-", "-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# What sets a report's times apart besides the device and the code: a B/A ratio across them is
# not the device's or the code's.
_COMPARED = ("model", "deep", "batch", "dtype", "image_size", "backend", "model_kwargs")


def _config_differences(a: dict[str, Any], b: dict[str, Any]) -> str:
    """The settings the two reports were measured under that differ, said after the header."""
    # The size measured where both reports record it; the override asked for where one does not.
    size = "image_size" if "image_size" in a and "image_size" in b else "img_size"
    keys = [size if k == "image_size" else k for k in _COMPARED]
    differ = [f"{k} {a.get(k)!r} (A) vs {b.get(k)!r} (B)" for k in keys if a.get(k) != b.get(k)]
    if not differ:
        return ""
    return "; measured under different settings, so B/A is not the device's alone: " + ", ".join(
        differ
    )


_LABELS = {"naive": "naive VPT", "fused": "fastprompt"}
_FREE = {
    "train": "prompt-free, full backward",
    "activation_bytes": "prompt-free, full backward",
    "peak_bytes": "prompt-free, full backward",
}


def plot(result: dict[str, Any], folder: str) -> list[str]:
    """PNG plots of latency, GFLOPs and memory against prompt count; returns the paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warn_at_caller("fastprompt bench: matplotlib is not installed, so no plots")
        return []
    rows = result["rows"]
    free = rows[0]
    prompts = sorted({r["prompts"] for r in rows[1:]})
    variants = list(dict.fromkeys(r["variant"] for r in rows[1:]))
    paths = []
    labels = ["inference latency (ms)", "training step (ms)", "GFLOPs per image"]
    labels += ["saved for backward (MiB)", f"peak {_peak_of(result)} (MiB)"]
    keys = ["infer", "train", "gflops", "activation_bytes", "peak_bytes"]
    figures = list(zip(FIGURES, keys, labels))
    batch = result["config"]["batch"]
    timed = ("infer", "train")
    for name, key, label in figures:
        if free.get(key) is None:
            continue

        def value(r, stat="median_s", key=key):
            if key in timed:
                return 1e3 * r[key][stat]
            return r[key] / batch if key == "gflops" else r[key] / 2**20

        fig, ax = plt.subplots(figsize=(5, 3.5))
        for variant in variants:
            picked = [
                r
                for p in prompts
                for r in rows
                if r["prompts"] == p and r["variant"] == variant and r.get(key) is not None
            ]
            if len(picked) != len(prompts):
                continue
            # At 0 prompts every variant is the prompt-free model, except where its backward
            # (full fine-tuning's) is what the others are set against.
            start = [] if key in _FREE else [free]
            xs = [0] * len(start) + prompts
            line = ax.plot(
                xs,
                [value(r) for r in start + picked],
                "o-" if variant == "naive" else "s-",
                label=_LABELS.get(variant, variant.replace("fused+", "fastprompt, memory=")),
            )[0]
            if key in timed:  # the p20-p80 band of the repetitions
                ax.fill_between(
                    xs,
                    [value(r, "p20_s") for r in start + picked],
                    [value(r, "p80_s") for r in start + picked],
                    color=line.get_color(),
                    alpha=0.2,
                    linewidth=0,
                )
        ax.axhline(value(free), color="gray", ls="--", label=_FREE.get(key, "prompt-free"))
        ax.set_xlabel("prompts per block" if result["config"]["deep"] else "prompts")
        ax.set_ylabel(label)
        ax.set_title(f"{result['config']['model']} on {result['env']['device']}", fontsize=8)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(folder, name)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
