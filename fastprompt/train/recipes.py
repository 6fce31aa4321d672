"""Training recipes: the official VPT and PGN optimisers, schedules and transforms, by name.

A :class:`Recipe` is a frozen dataclass: everything about *how* a run trains that is not the model
or the data. Recipes are named (:data:`RECIPES`), printed (:meth:`Recipe.describe`) and overridden
field by field (:meth:`Recipe.override`; :func:`apply_changes` is how ``fastprompt train`` and
:func:`fastprompt.fit` apply a user's changes); the resolved recipe is saved in every run folder.

- ``vpt`` (KMnP/vpt, ``src/solver``, ``src/data/transforms.py``): SGD with momentum 0.9; peak
  lr = base lr · batch / 256; a linear warmup from 0 over 10 epochs, then a half-cosine to 0 at
  epoch 100, the lr set once per epoch (epoch 0 runs at lr 0); weight decay 1e-4 on every
  trainable tensor but the head bias; batch 128. Transforms, as the official FGVC pipeline:
  training resizes the shorter side to ``floor(size / 0.875)`` (256 for 224, 438 for 384), takes
  a random ``size`` crop and flips horizontally with p 0.5 (``"fgvc"``); testing resizes the same
  way and takes the centre crop (``"resize-crop"``). The official code normalises with ImageNet's
  mean/std whatever the backbone; fastprompt uses the backbone's own (timm ``pretrained_cfg``:
  0.5/0.5 for ``vit_base_patch16_224.orig_in21k``) unless ``normalize="imagenet"``. The VTAB-1k
  presets of the CLI set it, with VTAB's square resize and no augmentation, as the official VTAB
  pipeline. The official code tunes the base lr per task on a validation split over {0.05, 0.1,
  0.25, 0.5, 1, 2.5, 5, 10, 25, 50} and the weight decay over {0, 1e-4, 1e-3, 1e-2}; the default
  base lr here (0.25) is fastprompt's pick from that grid.
- ``pgn`` (jochemloedeman/PGN): SGD lr 0.1 (not scaled with the batch), momentum 0.9, no weight
  decay, one parameter group; epoch e (0-based) runs at lr·max(e, 1)/50 for e < 50, then a
  half-cosine from lr to lr/100 reached at epoch 100 (never run); batch 128 (read off the released
  checkpoints' step counters); the official augmentation (``"pgn"`` transform) and a resize +
  centre crop at test time. The official code normalises with CLIP's statistics for every
  backbone; fastprompt uses the backbone's own (timm ``pretrained_cfg``) unless
  ``normalize="clip"``. Under torchrun the generator's BatchNorm normalises each process's share
  of the batch (``batch_norm="per-process"``, as the official code's DDP runs it);
  ``batch_norm="sync"`` (``--sync-bn``) normalises with the global batch
  (:mod:`fastprompt.train.syncbn`).
- ``e2vpt`` (ChengHan111/E2VPT, the same solver and data code as VPT's): VPT's optimiser,
  schedule, weight decay (the masks decay too; the head bias does not) and transforms, batch 64
  (the official VTAB-1k commands; their FGVC commands use 128). The official code tunes lr and
  weight decay over VPT's grids; the base lr here is VPT's pick.
- ``pc-finetune`` (Prompt Condensation's fine-tuning): VPT's optimiser and transforms
  (``fastprompt condense`` keeps its source run's transforms, normalisation, ``lr_scaling`` and
  optimiser: weight decay, ``no_decay`` and momentum, as the paper fine-tunes in the source's
  setup, whose weight decay VPT tunes per task; ``--weight-decay`` / ``--momentum`` change them),
  20 epochs, no warmup (cosine from the peak), prompt dropout off. The paper gives no lr;
  fastprompt uses a tenth of the source run's base lr (``lr=None`` means that;
  :func:`fastprompt.finetune`, which has no source run, takes a peak lr, default 0.01).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, fields, replace
from typing import Any

from fastprompt.methods.vpt import VTAB1K_PROMPTS  # VPT's per-task counts
from fastprompt.prompted import MEMORY_POLICIES
from fastprompt.train.optim import check_no_decay, classifier_name, make_optimizer, param_groups
from fastprompt.train.syncbn import BATCH_NORMS
from fastprompt.train.transforms import RESIZE_ROUNDINGS

__all__ = [
    "DATA_FIELDS",
    "MEMORY_POLICIES",
    "NORMALIZATIONS",
    "RECIPES",
    "SCHEDULES",
    "TRANSFORMS",
    "VTAB1K_PROMPTS",
    "Recipe",
    "apply_changes",
    "check_no_decay",
    "classifier_name",
    "coerce_field",
    "get_recipe",
    "lr_factor",
    "make_optimizer",
    "param_groups",
]

SCHEDULES = ("vpt", "pgn", "constant")
TRANSFORMS = ("resize-crop", "resize", "fgvc", "pgn", "pgn-test")
NORMALIZATIONS = ("backbone", "imagenet", "clip", "none")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
LR_SCALINGS = ("batch/256", "none")
BEST_BY = ("val_acc", "val_loss")
# The fields that say how images become tensors (a condensed run keeps its source run's).
DATA_FIELDS = (
    "train_transform",
    "test_transform",
    "crop_pct",
    "resize_rounding",
    "interpolation",
    "normalize",
)


@dataclass(frozen=True)
class Recipe:
    """How a run trains: optimiser, schedule, batch, transforms.

    Attributes
    ----------
    name : str
    epochs : int
        Total epochs T of the schedule.
    batch_size : int
        The global batch (split over processes under torchrun).
    lr : float or None
        Base learning rate; the peak is ``lr · batch_size / 256`` under ``lr_scaling="batch/256"``.
        None only in ``pc-finetune``: a tenth of the source run's base lr.
    lr_scaling : {"batch/256", "none"}
    schedule : {"vpt", "pgn", "constant"}
        Per-epoch learning rate (:func:`lr_factor`).
    warmup_epochs : int
    min_lr_ratio : float
        The cosine's floor as a fraction of the peak (``pgn``: 0.01).
    momentum : float
        SGD momentum (dampening 0, no Nesterov).
    weight_decay : float
    no_decay : tuple of str
        Trainable tensors (state-dict names) without weight decay. ``head.<name>`` also names
        that tensor of the model's classifier wherever it lives (``head.fc`` on a timm Swin), so
        ``head.bias`` is the official VPT code's exempt ``last_layer.bias`` on every backbone.
    train_transform, test_transform : str
        One of :data:`TRANSFORMS` (:mod:`fastprompt.train.transforms`); default ``fgvc`` (the
        official VPT training augmentation) and ``resize-crop``.
    crop_pct : float
        ``resize-crop`` and ``fgvc``: resize the shorter side to ``size / crop_pct``, then crop
        ``size`` (centre, random).
    resize_rounding : {"floor", "round"}
        How ``size / crop_pct`` becomes pixels: ``floor`` is the official VPT table (384 → 438)
        and timm's rule; ``round`` (384 → 439) is what runs made before this field rounded to,
        so a recipe read back without it (:meth:`from_dict`) keeps ``round``.
    interpolation : {"bilinear", "bicubic", "nearest"}
        Of the resizes (the ``pgn`` transform's random resized crop is bicubic, as official).
    normalize : {"backbone", "imagenet", "clip", "none"}
        ``backbone``: the mean/std of the model's timm ``pretrained_cfg``.
    prompt_dropout : float or None
        Sets the prompt source's dropout for the run (None: leave the model's).
    memory : {"none", "mlp", "block"} or None
        What each block keeps for backward (:attr:`fastprompt.PromptedViT.memory`; the same
        gradients under every policy); None: leave the model's.
    best_by : {"val_acc", "val_loss"}
        What makes a run's ``best/`` epoch: the highest validation top-1 (default), or the
        lowest validation loss (the official PGN ``ModelCheckpoint``'s choice).
    batch_norm : {"per-process", "sync"}
        Under torchrun, the prompt source's BatchNorm (PGN's generator) normalises each process's
        share of the batch, or the whole batch (:mod:`fastprompt.train.syncbn`); one process:
        the same.
    """

    name: str
    epochs: int
    batch_size: int
    lr: float | None
    lr_scaling: str = "batch/256"
    schedule: str = "vpt"
    warmup_epochs: int = 10
    min_lr_ratio: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    no_decay: tuple[str, ...] = ("head.bias",)
    train_transform: str = "fgvc"
    test_transform: str = "resize-crop"
    crop_pct: float = 0.875
    resize_rounding: str = "floor"
    interpolation: str = "bilinear"
    normalize: str = "backbone"
    prompt_dropout: float | None = None
    memory: str | None = None
    batch_norm: str = "per-process"
    best_by: str = "val_acc"

    def __post_init__(self) -> None:
        who = f"recipe {self.name!r}"
        for f in fields(self):
            object.__setattr__(self, f.name, coerce_field(f.name, getattr(self, f.name), who))
        _check(self)

    def peak_lr(self, base: float | None = None) -> float:
        """The learning rate the schedule peaks at (``base`` replaces a missing ``lr``)."""
        lr = self.lr if self.lr is not None else base
        if lr is None:
            raise ValueError(f"recipe {self.name!r}: lr is not set")
        return lr * self.batch_size / 256 if self.lr_scaling == "batch/256" else lr

    def lr_at(self, epoch: int, base: float | None = None) -> float:
        """The learning rate of epoch ``epoch`` (0-based)."""
        return self.peak_lr(base) * lr_factor(
            self.schedule, epoch, self.epochs, self.warmup_epochs, self.min_lr_ratio
        )

    def override(self, **changes: Any) -> Recipe:
        """A copy with some fields changed (values are checked; unknown names are refused)."""
        _check_names(changes)
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["no_decay"] = list(self.no_decay)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        """The recipe ``to_dict`` wrote (values are typed and checked; unknown names refused).

        A dict without ``resize_rounding`` was written before that field existed (``run.json``
        and ``trainer.pt`` of older runs), when the resize was rounded: it reads as ``round``,
        so such a run resumes and evaluates with the transforms it began with.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"recipe: expected a JSON object of fields, got {type(data).__name__}")
        _check_names(data)
        required = [f.name for f in fields(cls) if f.default is MISSING and f.name not in data]
        if required:
            raise ValueError(f"recipe: {required} missing")
        return cls(**{"resize_rounding": "round", **data})

    def describe(self, base: float | None = None) -> str:
        """A printable table of every field, the peak lr and a few epochs' lr."""
        rows = [(f.name, getattr(self, f.name)) for f in fields(self)]
        width = max(len(k) for k, _ in rows)
        lines = [f"recipe {self.name}"]
        lines += [f"  {k:<{width}}  {v}" for k, v in rows if k != "name"]
        try:
            peak = self.peak_lr(base)
        except ValueError:
            lines.append("  (peak lr: set from the source run)")
            return "\n".join(lines)
        marks = sorted({0, 1, self.warmup_epochs, self.epochs // 2, self.epochs - 1} - {-1})
        marks = [e for e in marks if 0 <= e < self.epochs]
        lines.append(f"  {'peak lr':<{width}}  {peak:.6g}")
        lines.append(
            f"  {'lr by epoch':<{width}}  "
            + ", ".join(f"{e}: {self.lr_at(e, base):.4g}" for e in marks)
        )
        return "\n".join(lines)


_KINDS = {
    "int": "an int",
    "float": "a finite number",
    "str": "a string",
    "tuple[str, ...]": "parameter names (a list, or a comma-separated string)",
}


def _check_names(changes: Mapping[str, Any]) -> None:
    known = [f.name for f in fields(Recipe)]
    unknown = sorted(set(changes) - set(known))
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"recipe: unknown fields {unknown}{hint}; known: {sorted(known)}")


def coerce_field(name: str, value: Any, who: str = "recipe") -> Any:
    """``value`` as the type of the recipe field ``name`` (``"12"`` → 12 for an int field,
    ``"0.1"`` → 0.1 for a float, ``"none"`` → None where the field allows it, ``"a,b"`` →
    ``("a", "b")`` for a list of names).

    Raises
    ------
    ValueError
        Naming the field, what it takes and what it got.
    """
    _check_names({name: value})
    kind = str(next(f.type for f in fields(Recipe) if f.name == name))
    optional = kind.endswith("| None")
    base = kind.replace(" | None", "")
    bad = ValueError(
        f"{who}: {name} must be {_KINDS[base]}{' or none' if optional else ''}, got {value!r}"
    )
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise bad
    if isinstance(value, bool):
        raise bad
    if base == "int":
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise bad from None
        raise bad
    if base == "float":
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise bad from None
        if isinstance(value, (int, float)) and math.isfinite(value):
            return float(value)
        raise bad
    if base == "str":
        if isinstance(value, str):
            return value
        raise bad
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise bad


def _check(r: Recipe) -> None:
    who = f"recipe {r.name!r}"

    def positive_int(name: str, value: Any, minimum: int = 1) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{who}: {name} must be an int >= {minimum}, got {value!r}")

    positive_int("epochs", r.epochs)
    positive_int("batch_size", r.batch_size)
    positive_int("warmup_epochs", r.warmup_epochs, 0)
    if r.schedule != "constant" and 0 < r.warmup_epochs >= r.epochs:
        # apply_changes rescales the warmup with the epochs; a recipe built or overridden
        # directly does not, and would train the whole run below its peak lr.
        raise ValueError(
            f"{who}: warmup_epochs={r.warmup_epochs} must be below epochs={r.epochs} (the lr "
            "would never reach its peak); give both, or change epochs through "
            "fastprompt.train.apply_changes, which rescales the warmup"
        )
    if r.lr is not None and (not isinstance(r.lr, (int, float)) or not r.lr >= 0):
        raise ValueError(f"{who}: lr must be >= 0, got {r.lr!r}")
    for name, value, options in (
        ("lr_scaling", r.lr_scaling, LR_SCALINGS),
        ("schedule", r.schedule, SCHEDULES),
        ("train_transform", r.train_transform, TRANSFORMS),
        ("test_transform", r.test_transform, TRANSFORMS),
        ("interpolation", r.interpolation, INTERPOLATIONS),
        ("resize_rounding", r.resize_rounding, RESIZE_ROUNDINGS),
        ("normalize", r.normalize, NORMALIZATIONS),
        ("batch_norm", r.batch_norm, BATCH_NORMS),
        ("best_by", r.best_by, BEST_BY),
    ):
        if value not in options:
            raise ValueError(f"{who}: {name} must be one of {options}, got {value!r}")
    for name in ("momentum", "weight_decay", "min_lr_ratio"):
        value = getattr(r, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{who}: {name} must be a number >= 0, got {value!r}")
    if not 0.0 < r.crop_pct <= 1.0:
        raise ValueError(f"{who}: crop_pct must be in (0, 1], got {r.crop_pct!r}")
    if r.prompt_dropout is not None and not 0.0 <= r.prompt_dropout < 1.0:
        raise ValueError(f"{who}: prompt_dropout must be in [0, 1), got {r.prompt_dropout!r}")
    if r.memory is not None and r.memory not in MEMORY_POLICIES:
        raise ValueError(f"{who}: memory must be one of {MEMORY_POLICIES}, got {r.memory!r}")
    if not all(isinstance(n, str) for n in r.no_decay):
        raise ValueError(f"{who}: no_decay must hold parameter names, got {r.no_decay!r}")


def lr_factor(schedule: str, epoch: int, epochs: int, warmup: int, min_ratio: float = 0.0) -> float:
    """The learning rate of epoch ``epoch`` (0-based) as a fraction of the peak.

    - ``"vpt"`` (the official ``WarmupCosineSchedule`` stepped once per epoch from a ``LambdaLR``,
      so epoch 0 runs at the lambda of 0): ``e / W`` for ``e < W``, then
      ``max(0, (1 + cos(π (e − W) / max(1, T − W))) / 2)``, scaled into ``[min_ratio, 1]``.
    - ``"pgn"`` (the official ``CosineWithWarmup``): ``max(e, 1) / W`` for ``e < W`` (epochs 0 and 1
      both at 1/W), then ``min_ratio + (1 − min_ratio)(1 + cos(π (e − W) / (T − W))) / 2``.
    - ``"constant"``: 1.
    """
    if schedule == "constant":
        return 1.0
    if epoch < warmup:
        return (max(epoch, 1) if schedule == "pgn" else epoch) / warmup
    progress = (epoch - warmup) / max(1, epochs - warmup)
    cosine = max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    if schedule not in ("vpt", "pgn"):
        raise ValueError(f"lr_factor: schedule must be one of {SCHEDULES}, got {schedule!r}")
    return min_ratio + (1.0 - min_ratio) * cosine


RECIPES: dict[str, Recipe] = {
    "vpt": Recipe(name="vpt", epochs=100, batch_size=128, lr=0.25),
    "e2vpt": Recipe(name="e2vpt", epochs=100, batch_size=64, lr=0.25),
    "pgn": Recipe(
        name="pgn",
        epochs=100,
        batch_size=128,
        lr=0.1,
        lr_scaling="none",
        schedule="pgn",
        warmup_epochs=50,
        min_lr_ratio=0.01,
        weight_decay=0.0,
        no_decay=(),
        train_transform="pgn",
        test_transform="pgn-test",
    ),
    "pc-finetune": Recipe(
        name="pc-finetune",
        epochs=20,
        batch_size=128,
        lr=None,
        warmup_epochs=0,
        prompt_dropout=0.0,
    ),
}


def get_recipe(name: str) -> Recipe:
    """The named recipe (a copy is not needed: recipes are frozen)."""
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"no recipe named {name!r}; known: {sorted(RECIPES)}") from None


def apply_changes(
    recipe: Recipe, changes: Mapping[str, Any], warmup_option: str = "--warmup-epochs {}"
) -> tuple[Recipe, list[str]]:
    """``recipe`` with a user's ``changes``, the way ``fastprompt train`` and
    :func:`fastprompt.fit` (and so :func:`fastprompt.e2vpt_pruning`) both apply them.

    Beyond :meth:`Recipe.override`: a change of ``epochs`` without ``warmup_epochs`` keeps the
    warmup's share of the schedule, ``round(warmup / epochs · new epochs)`` (``vpt``: 10 of 100,
    so 2 for 20 epochs; ``pgn``: 50 of 100), so a short run still warms up and decays; a note
    says so. A ``warmup_epochs`` given with a warming schedule must be below the epochs (the lr
    would never reach its peak). The peak lr is :meth:`Recipe.peak_lr` of the result: the base
    lr times ``batch_size / 256`` under ``lr_scaling="batch/256"``, ``batch_size`` being the
    batch the loader yields (the CLI's ``--batch-size``; ``fit``: its loader's).

    Parameters
    ----------
    recipe : Recipe
    changes : mapping
        Field name → value (coerced and checked as :meth:`Recipe.override` does).
    warmup_option : str
        How messages name a warmup of ``{}`` epochs (``"warmup_epochs={}"`` for ``fit``).

    Returns
    -------
    recipe : Recipe
    notes : list of str
        One line per change the user did not ask for in so many words.

    Raises
    ------
    ValueError
        A bad field or value; a ``warmup_epochs`` not below the epochs.
    """
    changes = dict(changes)
    notes: list[str] = []
    explicit = "warmup_epochs" in changes
    if not explicit and "epochs" in changes:
        epochs = coerce_field("epochs", changes["epochs"], f"recipe {recipe.name!r}")
        warmup = round(recipe.warmup_epochs / recipe.epochs * epochs)
        changes["warmup_epochs"] = warmup
        if warmup != recipe.warmup_epochs and recipe.schedule != "constant":
            notes.append(
                f"note: {epochs} epoch{'s' * (epochs != 1)} instead of the {recipe.name} "
                f"recipe's {recipe.epochs}: "
                f"the warmup is rescaled from {recipe.warmup_epochs} to {warmup} epochs (the same "
                f"share); {warmup_option.format(recipe.warmup_epochs)} keeps the recipe's"
            )
    if explicit:  # before the recipe's own check, which does not know the option's name
        who = f"recipe {recipe.name!r}"
        w = coerce_field("warmup_epochs", changes["warmup_epochs"], who)
        epochs = coerce_field("epochs", changes.get("epochs", recipe.epochs), who)
        schedule = changes.get("schedule", recipe.schedule)
        if schedule != "constant" and isinstance(w, int) and isinstance(epochs, int):
            if 0 < w >= epochs:
                raise ValueError(
                    f"{who}: {warmup_option.format(w)} must be below the {epochs} epochs of the "
                    "run (the lr would never reach its peak); give fewer warmup epochs or more "
                    "epochs"
                )
    return recipe.override(**changes), notes
