"""Ownership of a wrapped model: one live wrapper per model, one owner per parameter.

:class:`OwningWrapper` is the base of :class:`fastprompt.prompted.PromptedViT`. It wraps a model
without patching it (``docs/design.md`` §4, "Parameter ownership"):

- *one live wrapper per model*: a model's flags and modes before wrapping are recorded; a second
  wrapper of a model that a live one holds is refused (``share_with`` shares it on purpose);
  :meth:`OwningWrapper.unwrap` restores the record and ends every wrapper sharing the model;
  ``copy.deepcopy`` and unpickling give an independent wrapper of the copied model, registered
  as live;
- *one owner per parameter*: the wrapper registers the submodules, parameters and buffers of the
  model and of other owners (the prompt source) under their own names, and re-points the owners'
  entries at its own objects whenever those change (``.to()`` with parameter overwriting,
  ``to_empty()``, ``load_state_dict(assign=True)``, attribute assignment) and on request
  (:meth:`OwningWrapper._sync`, at every forward, for ``torch.func.functional_call``); an entry
  the model itself replaced (timm's ``reset_classifier``, ``set_input_size``) is taken instead.
"""

from __future__ import annotations

import copy
import weakref
from typing import Any

import torch
from torch import nn

__all__ = ["OwningWrapper"]


def _stand_in(value: Any) -> bool:
    """A plain tensor where a parameter belongs: ``functional_call``'s, for one call."""
    return value is not None and not isinstance(value, nn.Parameter)


class _Wrapping:
    """One model's wrapping: its flags and modes before, and the wrappers that share it."""

    def __init__(self, model: nn.Module) -> None:
        self.flags = {n: p.requires_grad for n, p in model.named_parameters()}
        self.modes = {n: m.training for n, m in model.named_modules()}
        self.active = True
        self.refs: list[weakref.ref] = []

    def live(self) -> bool:
        return any(r() is not None for r in self.refs)

    def __getstate__(self) -> dict[str, Any]:
        # Weak references do not pickle; an unpickled wrapper registers itself (__setstate__).
        return {**self.__dict__, "refs": []}


# model → its wrapping; weak, so a model that is gone leaves no entry.
_WRAPPINGS: weakref.WeakKeyDictionary[nn.Module, _Wrapping] = weakref.WeakKeyDictionary()


class OwningWrapper(nn.Module):
    """A module that wraps a model and owns the parameters it shares with it (see above)."""

    _model: nn.Module
    _wrapping: _Wrapping
    # Read by backbones.adapter_for, which may not import this module, to refuse a wrapper.
    wraps_a_model = True

    # -- ownership --------------------------------------------------------------------------------

    def _claim(self, model: nn.Module, share_with: OwningWrapper | None, who: str) -> _Wrapping:
        record = _WRAPPINGS.get(model)
        if share_with is not None:
            if share_with._model is not model or record is not share_with._wrapping:
                raise ValueError(f"{who}: share_with must be a live wrapper of the same model")
            share_with._check_live()
        elif record is not None and record.active and record.live():
            raise TypeError(
                f"{who}: this model is already wrapped by a live {type(self).__name__} (which "
                "froze its backbone and set up its head); call .unwrap() on that wrapper first, "
                "or wrap a copy.deepcopy(model)"
            )
        elif record is None or not record.active:
            record = _Wrapping(model)
            _WRAPPINGS[model] = record
        # else: earlier wrappers were dropped without unwrap(); the model is still frozen, and
        # the record keeps its state from before, so a later unwrap() restores that state.
        record.refs = [r for r in record.refs if r() is not None] + [weakref.ref(self)]
        return record

    def __deepcopy__(self, memo: dict[int, Any]) -> OwningWrapper:
        """An independent wrapper of a copy of the model, registered as that copy's live wrapper.

        Wrappers copied together (one ``deepcopy`` of a structure holding a model and its
        condensed model) share the copied model and its wrapping, as the originals do.
        """
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        new._register_copy()
        return new

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickled (``pickle``, ``torch.save`` of the module): like a deep copy, an independent
        wrapper of the unpickled model, registered as its live wrapper."""
        super().__setstate__(state)
        self._register_copy()

    def _register_copy(self) -> None:
        record = self._wrapping
        if record.active:
            if _WRAPPINGS.get(self._model) is not record:
                record.refs = []  # copied weak references point at the originals
                _WRAPPINGS[self._model] = record
            record.refs.append(weakref.ref(self))

    def _check_live(self) -> None:
        if not self._wrapping.active:
            raise RuntimeError(
                "fastprompt: this prompted model was unwrapped (its backbone is no longer "
                "frozen); wrap the model again to use prompts"
            )

    def unwrap(self) -> nn.Module:
        """Return the model with its original ``requires_grad`` flags and modes restored.

        The model's weights (including the trained head) are the ones this wrapper used; the
        prompts stay in this wrapper, which (with any wrapper sharing the model) stops working.
        """
        self._check_live()
        self._sync()
        record = self._wrapping
        for name, param in self._model.named_parameters():
            param.requires_grad_(record.flags.get(name, param.requires_grad))
        for name, module in self._model.named_modules():
            module.training = record.modes.get(name, module.training)
        record.active = False
        if _WRAPPINGS.get(self._model) is record:
            del _WRAPPINGS[self._model]
        return self._model

    # -- adoption: the wrapper owns the parameters the model and the source also hold ---------

    def _adopt(self, owner: nn.Module) -> None:
        # What the wrapper and each owner last agreed on, by name (names are unique across owners).
        agreed = self.__dict__.setdefault("_agreed", {})
        names = []
        for name, child in owner.named_children():
            self._check_free(name, owner)
            self.add_module(name, child)
            names.append(name)
            agreed[name] = child
        for name, param in owner._parameters.items():  # None entries too (VPT-shallow's deep set)
            self._check_free(name, owner)
            self.register_parameter(name, param)
            names.append(name)
            agreed[name] = param
        for name, buf in owner.named_buffers(recurse=False):
            self._check_free(name, owner)
            self.register_buffer(
                name, buf, persistent=name not in owner._non_persistent_buffers_set
            )
            names.append(name)
            agreed[name] = buf
        self._adopted.append((owner, tuple(names)))

    def _check_free(self, name: str, owner: nn.Module) -> None:
        if name in self._modules or name in self._parameters or name in self._buffers:
            raise ValueError(
                f"fastprompt: {type(owner).__name__} has an attribute {name!r} that another part "
                "of the prompted model already uses"
            )

    def _sync(self) -> None:
        """Agree the wrapper's entries with the model's and the source's.

        The side that replaced an entry since they last agreed wins: the wrapper's (``.to()``,
        ``load_state_dict(assign=True)``, ``functional_call``) is copied to its owner; the owner's
        (timm's ``reset_classifier`` or ``set_input_size`` called on the model) is taken, through
        :meth:`_taken_from_owner`, when it is what an owner's own method makes: a parameter or a
        module. A plain tensor in an owner's parameter table is ``functional_call``'s stand-in
        (perhaps another wrapper's of a shared model): it is never taken and never agreed on.
        Where both sides replaced an entry, the wrapper's wins.
        """
        agreed = self._agreed
        for owner, names in self._adopted:
            for name in names:
                for table in ("_parameters", "_buffers", "_modules"):
                    mine = getattr(self, table)
                    if name not in mine:
                        continue
                    theirs = getattr(owner, table)
                    value = theirs.get(name)
                    if value is not mine[name]:
                        taken = (
                            name in theirs
                            and table != "_buffers"
                            and (value is None or isinstance(value, (nn.Parameter, nn.Module)))
                            and mine[name] is agreed.get(name)
                        )
                        if taken and torch.compiler.is_compiling():
                            raise RuntimeError(
                                f"fastprompt: the wrapped model replaced its {name!r} (timm's "
                                "reset_classifier or set_input_size?) since the wrapper last "
                                "saw it; let the wrapper see it eagerly first (call "
                                "prompted.reset_classifier, or prompted.trainable_parameters())"
                            )
                        if taken:
                            mine[name] = value
                            self._taken_from_owner(owner, value)
                        else:
                            theirs[name] = mine[name]
                    if table != "_parameters" or not _stand_in(mine[name]):
                        agreed[name] = mine[name]
                    break

    def _taken_from_owner(self, owner: nn.Module, value: Any) -> None:
        """Hook: ``value`` replaced an entry of ``owner`` and is now the wrapper's."""

    # What lists, converts, saves or loads the wrapper's entries sees the owners' replacements.

    def _apply(self, fn, recurse=True):
        self._sync()
        result = super()._apply(fn, recurse)
        self._sync()
        return result

    def named_parameters(self, *args: Any, **kwargs: Any):
        self._sync()
        return super().named_parameters(*args, **kwargs)

    def named_buffers(self, *args: Any, **kwargs: Any):
        self._sync()
        return super().named_buffers(*args, **kwargs)

    def named_modules(self, *args: Any, **kwargs: Any):
        self._sync()
        return super().named_modules(*args, **kwargs)

    def state_dict(self, *args: Any, **kwargs: Any):
        self._sync()
        return super().state_dict(*args, **kwargs)

    def load_state_dict(self, *args: Any, **kwargs: Any):
        self._sync()
        result = super().load_state_dict(*args, **kwargs)
        self._sync()  # assign=True replaced the wrapper's entries
        return result

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if any(name in names for _, names in self.__dict__.get("_adopted", ())):
            self._sync()
