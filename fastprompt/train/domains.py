"""Domain discovery: do a PGN's mixture weights tell the datasets it was trained on apart?

The PGN paper (Loedeman et al., Figure 5) trains one generator and token library on several
datasets and shows that images of different datasets pick different mixtures of the library
tokens. This module measures and draws that for any PGN model and any labelled mixture of
images (:mod:`fastprompt.train.multi`):

- **features**: each image's mixture weights over the library, (L, M) flattened to L·M (the
  generator in eval mode: BatchNorm running statistics);
- **separation**: nearest-centroid accuracy of the dataset label from those features, held out:
  per dataset a seeded half of the images gives the centroids (Euclidean, as scikit-learn's
  ``NearestCentroid``; features that are the same for every image, a saturated generator, classify
  every image as the first dataset) and the other half is classified; a number in [0, 1], printed
  beside ``chance`` (the largest dataset's share of the held-out half) and beside the same number
  for the run's untrained model (``init/``). The baseline matters: a random generator already
  maps images of visibly different datasets (inverted digits, say) to different mixtures, so
  only the gain over it is what training discovered;
- **picture**: the features embedded in 2-D (PCA by default, t-SNE on request; scikit-learn),
  one colour per dataset, written as a PNG with matplotlib, and the figures as JSON beside it.

scikit-learn and matplotlib are the optional ``domains`` extra (``pip install
'fastprompt[domains]'``); without them the functions here raise an ImportError saying so.
``fastprompt train`` writes ``domains.png`` and ``domains.json`` at the end of a PGN run over
several datasets (when the extra is installed; otherwise its log says why not).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor, nn

from fastprompt._warnings import warn_at_caller

__all__ = [
    "EMBEDDINGS",
    "DomainReport",
    "domain_report",
    "embed_2d",
    "extra_missing",
    "mixture_features",
    "run_report",
    "separation",
]

EMBEDDINGS = ("pca", "tsne")
EXTRA = "pip install 'fastprompt[domains]' (scikit-learn and matplotlib)"


def extra_missing() -> str | None:
    """None when scikit-learn and matplotlib import, else a one-line reason naming the extra."""
    missing = []
    for module, package in (("sklearn", "scikit-learn"), ("matplotlib", "matplotlib")):
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    if missing:
        return f"the domain report needs {' and '.join(missing)}: {EXTRA}"
    return None


def _require() -> None:
    reason = extra_missing()
    if reason:
        raise ImportError(reason)


@dataclass(frozen=True)
class DomainReport:
    """What :func:`domain_report` found.

    Attributes
    ----------
    separation : float
        Held-out nearest-centroid accuracy of the dataset label from the mixture weights, [0, 1].
    chance : float
        The largest dataset's share of the held-out images (what always guessing it scores).
    held_out : int
        Images classified for ``separation``.
    samples : dict
        Images per dataset.
    embedding : str
        ``"pca"`` or ``"tsne"``.
    png, json : str or None
        The files written.
    separation_baseline : float or None
        ``separation`` of the baseline model (the run's untrained one), on the same images.
    """

    separation: float
    chance: float
    held_out: int
    samples: dict[str, int]
    embedding: str
    png: str | None = None
    json: str | None = None
    separation_baseline: float | None = None


@torch.no_grad()
def mixture_features(
    prompted: nn.Module, loader: Iterable, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """Every image's mixture weights over the token library, and its label.

    Parameters
    ----------
    prompted : PromptedViT
        From :func:`fastprompt.pgn` with a generator (evaluated in eval mode).
    loader : iterable of (images, labels)
        Images (B, C, H, W) normalised as the model's input.
    device : optional
        Default the model's.

    Returns
    -------
    features : Tensor, shape (N, L·M), float32
    labels : Tensor, shape (N,), int64
    """
    source = getattr(prompted, "source", None)
    if getattr(prompted, "method", None) != "pgn" or not hasattr(source, "mixture"):
        raise TypeError(
            "mixture_features: expected a PGN model with a generator (fastprompt.pgn(..., "
            f"generator='resnet10')), got {getattr(prompted, 'method', type(prompted).__name__)!r}"
        )
    device = torch.device(device) if device is not None else next(prompted.parameters()).device
    training = prompted.training
    prompted.eval()
    feats, labels = [], []
    try:
        for images, y in loader:
            weights = source.mixture(images.to(device))  # type: ignore[union-attr]
            feats.append(weights.flatten(1).float().cpu())
            labels.append(torch.as_tensor(y).cpu())
    finally:
        prompted.train(training)
    if not feats:
        raise ValueError("mixture_features: the loader yielded no images")
    return torch.cat(feats), torch.cat(labels).long()


def separation(features: Tensor, domains: Tensor, seed: int = 0) -> tuple[float, float, int]:
    """Held-out nearest-centroid accuracy of ``domains`` from ``features``.

    Per dataset, a seeded random half (rounded down, at least one image) fits the centroids and
    the rest is classified.

    Parameters
    ----------
    features : Tensor, shape (N, F)
    domains : Tensor, shape (N,)
        Dataset index of every image.
    seed : int

    Returns
    -------
    accuracy : float
        In [0, 1].
    chance : float
        The largest dataset's share of the held-out images.
    held_out : int

    Raises
    ------
    ValueError
        Fewer than two datasets, or a dataset with fewer than two images.
    """
    _require()
    x = features.double().numpy()
    d = domains.numpy()
    present, counts = np.unique(d, return_counts=True)
    if len(present) < 2:
        raise ValueError(f"separation: needs images of at least two datasets, got {len(present)}")
    if counts.min() < 2:
        raise ValueError(
            "separation: every dataset needs at least two images (one to fit, one to test), "
            f"dataset {present[counts.argmin()]} has {counts.min()}"
        )
    rng = np.random.default_rng(seed)
    fit, test = [], []
    for k in present:
        idx = rng.permutation(np.flatnonzero(d == k))
        cut = max(1, len(idx) // 2)
        fit.append(idx[:cut])
        test.append(idx[cut:])
    test_i = np.concatenate(test)
    # Computed here rather than with scikit-learn's NearestCentroid, whose fit refuses features
    # that are the same for every image (a saturated generator) instead of classifying them;
    # ties go to the first dataset, as its predict would.
    centroids = np.stack([x[f].mean(axis=0) for f in fit])
    distances = ((x[test_i, None, :] - centroids[None]) ** 2).sum(-1)
    accuracy = float((present[distances.argmin(1)] == d[test_i]).mean())
    chance = float(np.bincount(d[test_i]).max() / len(test_i))
    return accuracy, chance, len(test_i)


def embed_2d(features: Tensor, method: str = "pca", seed: int = 0) -> np.ndarray:
    """``features`` (N, F) embedded in 2-D: PCA, or t-SNE (perplexity min(30, (N − 1) / 3)).

    Returns
    -------
    ndarray, shape (N, 2)
    """
    if method not in EMBEDDINGS:
        raise ValueError(f"embed_2d: method must be one of {EMBEDDINGS}, got {method!r}")
    _require()
    x = features.double().numpy()
    if x.shape[0] < 3:
        raise ValueError(f"embed_2d: needs at least 3 images, got {x.shape[0]}")
    if np.ptp(x, axis=0).max() <= 1e-6 * max(1.0, float(np.abs(x).max())):
        # A saturated generator: scikit-learn's t-SNE crashes the process (a segmentation
        # fault) on rows this close, and PCA has no direction to show.
        warn_at_caller(
            f"embed_2d: every image's features are the same (to 1e-6; {x.shape[0]} images): the "
            "generator gives every image the same mixture, so the picture is one point"
        )
        return np.zeros((x.shape[0], 2))
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(x)
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, max(1.0, (x.shape[0] - 1) / 3)))
    return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


def _plot(xy: np.ndarray, domains: np.ndarray, names: Sequence[str], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    for k, name in enumerate(names):
        sel = domains == k
        if sel.any():
            ax.scatter(xy[sel, 0], xy[sel, 1], s=9, alpha=0.7, label=f"{name} ({sel.sum()})")
    ax.set(xlabel="component 1", ylabel="component 2", title=title)
    ax.legend(markerscale=2, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def domain_report(
    prompted: nn.Module,
    loader: Iterable,
    label_domains: Tensor,
    names: Sequence[str],
    path: str | None,
    embedding: str = "pca",
    seed: int = 0,
    baseline: nn.Module | None = None,
) -> DomainReport:
    """Mixture weights of ``loader``'s images, their separation by dataset, and their picture.

    Parameters
    ----------
    prompted : PromptedViT
        A PGN model with a generator.
    loader : iterable of (images, labels)
    label_domains : Tensor, shape (C,)
        The dataset index of every label (:func:`fastprompt.train.multi.class_domains`); for
        images labelled by dataset directly, ``torch.arange(G)``.
    names : sequence of str
        Dataset names, by index.
    path : str or None
        The PNG to write (its figures go to the same name with ``.json``); None writes nothing.
    embedding : {"pca", "tsne"}
    seed : int
        Of the held-out split and the embedding.
    baseline : PromptedViT, optional
        A model to compare with (the untrained one): its separation on the same images.

    Returns
    -------
    DomainReport
    """
    if embedding not in EMBEDDINGS:
        raise ValueError(f"domain_report: embedding must be one of {EMBEDDINGS}, got {embedding!r}")
    _require()
    features, labels = mixture_features(prompted, loader)
    domains = label_domains.cpu()[labels]
    accuracy, chance, held_out = separation(features, domains, seed)
    base = None
    if baseline is not None:
        base_features, _ = mixture_features(baseline, loader)
        base = separation(base_features, domains, seed)[0]
    d = domains.numpy()
    samples = {name: int((d == k).sum()) for k, name in enumerate(names)}
    png = js = None
    if path is not None:
        xy = embed_2d(features, embedding, seed)
        title = (
            f"PGN mixture weights ({embedding.upper()})\nnearest-centroid separation "
            f"{100 * accuracy:.1f}% held out ("
            + (f"untrained {100 * base:.1f}%, " if base is not None else "")
            + f"chance {100 * chance:.1f}%)"
        )
        _plot(xy, d, names, path, title)
        png, js = path, os.path.splitext(path)[0] + ".json"
    report = DomainReport(accuracy, chance, held_out, samples, embedding, png, js, base)
    if js is not None:
        record = {**asdict(report), "features": "mixture weights, L*M per image"}
        with open(js, "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
    return report


def run_report(
    run: str,
    checkpoint: str = "best",
    path: str | None = None,
    embedding: str = "pca",
    device: str | torch.device = "cpu",
    batch_size: int = 64,
) -> DomainReport:
    """:func:`domain_report` of a PGN run over several datasets, on its validation images,
    with the run's untrained model (``init/``) as the baseline.

    Parameters
    ----------
    run : str
        A run folder (``fastprompt train --method pgn --data a/ --data b/ ...``).
    checkpoint : {"best", "last", "init"}
    path : str, optional
        Default ``run/domains.png``.
    embedding, device, batch_size

    Raises
    ------
    RunError
        Not a run over several datasets, not a PGN run with a generator.
    """
    from fastprompt.train import data as D
    from fastprompt.train import multi as M
    from fastprompt.train.folder import RunError
    from fastprompt.train.run import load_run_model, read_run, transforms_for
    from fastprompt.train.splits import run_data

    _require()
    config, saved = read_run(run)
    if not M.is_mixture(config.data.train):
        raise RunError(f"{run} trained on one dataset ({config.data.train}); nothing to separate")
    if config.method != "pgn" or config.method_args.get("generator", "resnet10") is None:
        raise RunError(f"{run} is not a PGN run with a generator (method {config.method!r})")
    model = load_run_model(run, checkpoint, device, config, saved)
    base = None if checkpoint == "init" else load_run_model(run, "init", device, config, saved)
    data = run_data(run, config, saved)
    _, test_tf, _ = transforms_for(model.model, config.recipe)
    spec = D.LoaderSpec(batch_size, 0, False, config.seed)
    loader = D.make_loader(D.Transformed(data.val, test_tf), spec)
    names, label_domains = M.class_domains(data.classes)
    out = path or os.path.join(run, "domains.png")
    return domain_report(model, loader, label_domains, names, out, embedding, config.seed, base)
