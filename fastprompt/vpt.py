"""Drop-in VPT for timm ``VisionTransformer`` (tier 3 module + the ``vpt()`` entry point).

The wrapper registers the timm model's own submodules and parameters under their own names, so
``state_dict()`` keys are the model's keys plus the official VPT ones (``prompt_embeddings``,
``deep_prompt_embeddings``, ``prompt_proj.*``). Nothing in timm is patched: :meth:`unwrap` hands
the model back with its ``requires_grad`` flags and train/eval modes restored.

Two implementations share the same parameters and give the same logits:

- ``impl="naive"``: the official computation. Prompts are real tokens in every block
  (``[CLS(+registers), prompts, patches]``), deep prompt outputs are overwritten before each block.
- ``impl="fused"`` (default): for deep prompts only the prompts' keys/values matter, so per block
  they are computed once (shared by the batch, or per image under prompt dropout) and the image
  queries attend to ``[K_p; K_img]`` through :func:`fastprompt.ops.prompt_attention`; prompt rows of
  Q, attention output, projection, LN2 and MLP are never computed. A readout that reads prompt
  outputs makes only the last block compute them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastprompt.ops import prompt_attention

__all__ = ["READOUTS", "PromptedViT", "VPTConfig", "vpt"]

READOUTS = ("cls", "patches", "patches+prompts")
_IMPLS = ("fused", "naive")


@dataclass(frozen=True)
class VPTConfig:
    """How a model is prompted; saved beside the prompts so a checkpoint rebuilds the wrapper.

    Attributes
    ----------
    num_prompts : int
        Prompt tokens per set (per block when deep).
    deep : bool
        A prompt set per block (VPT-deep) or one before block 0 (VPT-shallow).
    dropout : float
        Prompt dropout probability, applied per image after expanding over the batch.
    project : int
        Prompt dimension before a Linear projection to the model width; -1 means no projection.
    readout : str
        ``"cls"``, ``"patches"`` or ``"patches+prompts"`` (the official avg-pool path).
    layer_counts : tuple of int, optional
        Prompts per block after condensation (deep only); None means ``num_prompts`` in every
        block. Deep prompts of blocks ≥ 1 are then packed in one (Σ counts, D) parameter.
    """

    num_prompts: int
    deep: bool = True
    dropout: float = 0.0
    project: int = -1
    readout: str = "cls"
    layer_counts: tuple[int, ...] | None = None


def _model_signature(model: nn.Module) -> dict[str, Any]:
    """What a prompt checkpoint must agree with to load onto a model."""
    return {
        "class": type(model).__name__,
        "embed_dim": int(model.embed_dim),
        "depth": len(model.blocks),
        "num_heads": int(model.blocks[0].attn.num_heads) if len(model.blocks) else 0,
        "patch_size": list(_patch_size(model)),
        "num_prefix_tokens": int(model.num_prefix_tokens),
        "num_classes": int(model.num_classes),
    }


def _patch_size(model: nn.Module) -> tuple[int, int]:
    ps = model.patch_embed.patch_size
    return (ps, ps) if isinstance(ps, int) else tuple(ps)


def _check_wrappable(model: nn.Module, impl: str, deep: bool) -> None:
    """Raise a clear error when ``model`` is not a timm ViT whose forward we reproduce exactly."""
    try:
        from timm.models.vision_transformer import Attention, Block, VisionTransformer
    except ImportError as e:  # pragma: no cover - timm is a dependency
        raise ImportError("fastprompt.vpt needs timm installed") from e
    if isinstance(model, PromptedViT):
        raise TypeError("fastprompt.vpt: this model is already prompted; call .unwrap() first")
    if not isinstance(model, VisionTransformer):
        raise TypeError(
            "fastprompt.vpt: model must be a timm VisionTransformer (vit_*, deit_*), got "
            f"{type(model).__module__}.{type(model).__name__}"
        )
    for method in ("forward_features", "forward_head", "_pos_embed"):
        if getattr(type(model), method) is not getattr(VisionTransformer, method):
            raise TypeError(
                f"fastprompt.vpt: {type(model).__name__} overrides VisionTransformer.{method} "
                "(e.g. DeiT's distillation token), so the prompted forward would not match it"
            )
    if getattr(model, "attn_pool", None) is not None or model.global_pool not in ("token", "avg"):
        raise ValueError(
            f"fastprompt.vpt: global_pool={model.global_pool!r} is not supported; VPT reads "
            "the CLS token ('token') or averages tokens ('avg')"
        )
    if getattr(model, "pool_include_prefix", False):
        raise ValueError("fastprompt.vpt: pool_include_prefix=True is not supported")
    if impl == "naive" or not deep:
        return
    for i, blk in enumerate(model.blocks):
        attn = getattr(blk, "attn", None)
        if type(blk).forward is not Block.forward or type(attn).forward is not Attention.forward:
            raise TypeError(
                f"fastprompt.vpt: block {i} is {type(blk).__name__} with "
                f"{type(attn).__name__}; the fused path reproduces timm's vision_transformer."
                "Block/Attention only. Use impl='naive' for other blocks."
            )


def _check_counts(config: VPTConfig, depth: int) -> list[int]:
    counts = config.layer_counts
    if counts is None:
        return [config.num_prompts] * max(depth, 1)
    if not config.deep:
        raise ValueError("fastprompt: layer_counts needs deep prompts")
    if len(counts) != depth or any(
        isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in counts
    ):
        raise ValueError(
            f"fastprompt: layer_counts must hold {depth} ints >= 0 (one per block), got {counts}"
        )
    return list(counts)


def _check_args(num_prompts, deep, dropout, project, readout, impl) -> None:
    if isinstance(num_prompts, bool) or not isinstance(num_prompts, int):
        raise TypeError(
            f"fastprompt.vpt: num_prompts must be an int, got {type(num_prompts).__name__} "
            f"({num_prompts!r})"
        )
    if num_prompts < 0:
        raise ValueError(f"fastprompt.vpt: num_prompts must be >= 0, got {num_prompts}")
    if not isinstance(deep, bool):
        raise TypeError(f"fastprompt.vpt: deep must be a bool, got {type(deep).__name__}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"fastprompt.vpt: dropout must be in [0, 1), got {dropout}")
    if isinstance(project, bool) or not isinstance(project, int) or (project < 1 and project != -1):
        raise ValueError(
            f"fastprompt.vpt: project must be -1 (none) or a width >= 1, got {project!r}"
        )
    if readout not in READOUTS:
        raise ValueError(f"fastprompt.vpt: readout must be one of {READOUTS}, got {readout!r}")
    if impl not in _IMPLS:
        raise ValueError(f"fastprompt.vpt: impl must be one of {_IMPLS}, got {impl!r}")


class PromptedViT(nn.Module):
    """A timm ``VisionTransformer`` with VPT prompts; build it with :func:`vpt`.

    Parameters
    ----------
    model : timm.models.vision_transformer.VisionTransformer
        The backbone; it is frozen and kept in eval mode, its head stays trainable.
    config : VPTConfig
        Prompt settings.
    impl : {"fused", "naive"}
        Computation; both give the same numbers.
    backend : str, optional
        Backend for :func:`fastprompt.ops.prompt_attention`; None picks the best.
    head_init : {"vpt", "keep"}
        ``"vpt"`` re-initialises the head as the official code (kaiming-normal fan-out weight,
        bias −log(99) ≈ −4.595); ``"keep"`` leaves it.
    """

    def __init__(
        self,
        model: nn.Module,
        config: VPTConfig,
        impl: str = "fused",
        backend: str | None = None,
        head_init: str = "vpt",
    ) -> None:
        super().__init__()
        _check_args(
            config.num_prompts, config.deep, config.dropout, config.project, config.readout, impl
        )
        _check_wrappable(model, impl, config.deep)
        if head_init not in ("vpt", "keep"):
            raise ValueError(
                f"fastprompt.vpt: head_init must be 'vpt' or 'keep', got {head_init!r}"
            )
        if config.readout == "cls" and model.cls_token is None:
            raise ValueError("fastprompt.vpt: readout='cls' needs a model with a class token")
        # Kept out of the module tree: its children are registered below under their own names.
        object.__setattr__(self, "_model", model)
        self._saved_flags = {n: p.requires_grad for n, p in model.named_parameters()}
        self._saved_modes = {n: m.training for n, m in model.named_modules()}
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, param in model.named_parameters(recurse=False):
            self.register_parameter(name, param)
        if list(model.named_buffers(recurse=False)):
            raise TypeError("fastprompt.vpt: models with top-level buffers are not supported")
        self.config = config
        self.impl = impl
        self.backend = backend

        dim = model.embed_dim
        prompt_dim = dim if config.project == -1 else config.project
        depth = len(model.blocks)
        counts = _check_counts(config, depth)
        self._offsets = [0]
        for n in counts[1:]:
            self._offsets.append(self._offsets[-1] + n)
        ref = (
            model.patch_embed.proj.weight if hasattr(model.patch_embed, "proj") else model.pos_embed
        )
        kw = {"device": ref.device, "dtype": ref.dtype}
        ph, pw = _patch_size(model)
        val = math.sqrt(6.0 / float(3 * ph * pw + prompt_dim))
        self.prompt_embeddings = nn.Parameter(
            torch.empty(1, counts[0], prompt_dim, **kw).uniform_(-val, val)
        )
        if config.layer_counts is not None:
            self.deep_prompt_embeddings = nn.Parameter(
                torch.empty(self._offsets[-1], prompt_dim, **kw).uniform_(-val, val)
            )
        elif config.deep:
            self.deep_prompt_embeddings = nn.Parameter(
                torch.empty(max(depth - 1, 0), config.num_prompts, prompt_dim, **kw).uniform_(
                    -val, val
                )
            )
        else:
            self.deep_prompt_embeddings = None
        if config.project == -1:
            self.prompt_proj = nn.Identity()
        else:
            self.prompt_proj = nn.Linear(prompt_dim, dim, **kw)
            nn.init.kaiming_normal_(self.prompt_proj.weight, a=0, mode="fan_out")
        self.prompt_dropout = nn.Dropout(config.dropout)

        for param in model.parameters():
            param.requires_grad_(False)
        head = model.get_classifier()
        if isinstance(head, nn.Linear):
            if head_init == "vpt":
                nn.init.kaiming_normal_(head.weight, a=0, mode="fan_out")
                if head.bias is not None:
                    nn.init.constant_(head.bias, -math.log((1 - 0.01) / 0.01))
            head.requires_grad_(True)
        self._kv_cache: tuple[tuple, list[tuple[Tensor, Tensor]]] | None = None
        # Set by methods (Prompt Condensation's scoring) to see each block's prompt attention.
        self.attention_hook: Callable[..., Tensor] | None = None
        # (L, P) bool mask of the prompts kept from the model this one was condensed from.
        self.condensed_from: Tensor | None = None
        self.train(model.training)

    # -- modes and bookkeeping ------------------------------------------------------------------

    def train(self, mode: bool = True) -> PromptedViT:
        """Set prompt-side modules' mode; the frozen backbone always stays in eval mode."""
        self.training = mode
        self._model.eval()
        self.prompt_proj.train(mode)
        self.prompt_dropout.train(mode)
        return self

    @property
    def model(self) -> nn.Module:
        """The wrapped timm model (shares every parameter with this wrapper)."""
        return self._model

    def unwrap(self) -> nn.Module:
        """Return the timm model with its original ``requires_grad`` flags and modes restored.

        The model's weights (including the trained head) are the ones this wrapper used; the
        prompts stay in this wrapper.
        """
        for name, param in self._model.named_parameters():
            param.requires_grad_(self._saved_flags[name])
        for name, module in self._model.named_modules():
            module.training = self._saved_modes[name]
        return self._model

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Parameters that VPT trains: prompts, projection and head."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def print_trainable_parameters(self) -> None:
        """Print trainable / total parameter counts, as PEFT does."""
        trainable = sum(p.numel() for p in self.trainable_parameters().values())
        total = sum(p.numel() for p in self.parameters())
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100.0 * trainable / max(total, 1):.4f}"
        )

    def save_prompts(self, path: str) -> None:
        """Save prompts, projection, head and config (safetensors + json) to a folder."""
        from fastprompt.checkpoint import save_prompts

        save_prompts(self, path)

    def extra_repr(self) -> str:
        c = self.config
        counts = "" if c.layer_counts is None else f", layer_counts={list(c.layer_counts)}"
        return (
            f"num_prompts={c.num_prompts}{counts}, deep={c.deep}, dropout={c.dropout}, "
            f"project={c.project}, readout={c.readout!r}, impl={self.impl!r}"
        )

    # -- prompts --------------------------------------------------------------------------------

    @property
    def num_prompts(self) -> int:
        return self.config.num_prompts

    def prompt_count(self, block: int) -> int:
        """Prompts that ``block`` receives (its own set when deep, block 0's when shallow)."""
        counts = self.config.layer_counts
        if counts is not None:
            return counts[block]
        return self.config.num_prompts

    def _prompt_set(self, block: int) -> Tensor:
        """Prompt set of ``block`` before dropout, shape (P_block, D)."""
        if block == 0:
            raw = self.prompt_embeddings[0]
        elif self.config.layer_counts is not None:
            start = self._offsets[block - 1]
            raw = self.deep_prompt_embeddings[start : start + self.config.layer_counts[block]]
        else:
            raw = self.deep_prompt_embeddings[block - 1]
        return self.prompt_proj(raw)

    def _prompts_for(self, block: int, batch: int) -> Tensor:
        """Prompt tokens of ``block``: (1, P, D) shared, or (B, P, D) with a dropout mask per image.

        Dropout is drawn after expanding over the batch, in block order, as the official code
        does, so the same seed gives the same masks in the naive and fused paths.
        """
        p = self._prompt_set(block).unsqueeze(0)
        if self.prompt_dropout.training and self.prompt_dropout.p > 0:
            return self.prompt_dropout(p.expand(batch, -1, -1))
        return p

    # -- forward --------------------------------------------------------------------------------

    def forward_features(self, x: Tensor) -> Tensor:
        """Final normalised tokens.

        Parameters
        ----------
        x : Tensor, shape (B, C, H, W)

        Returns
        -------
        Tensor, shape (B, N_tokens, D)
            ``[prefix, patches]`` on the fused deep path when the readout ignores prompts,
            ``[prefix, prompts, patches]`` otherwise.
        """
        m = self._model
        x = m.patch_drop(m._pos_embed(m.patch_embed(x)))
        if self.impl == "naive" or not self.config.deep:
            return m.norm(self._naive_blocks(x))
        return m.norm(self._fused_blocks(x))

    def _naive_blocks(self, x: Tensor) -> Tensor:
        m = self._model
        b, npre = x.shape[0], m.num_prefix_tokens
        x = torch.cat([x[:, :npre], self._prompts_for(0, b).expand(b, -1, -1), x[:, npre:]], 1)
        x = m.norm_pre(x)
        for i, blk in enumerate(m.blocks):
            if i > 0 and self.config.deep:
                prompts = self._prompts_for(i, b).expand(b, -1, -1)
                x = torch.cat([x[:, :npre], prompts, x[:, npre + self.prompt_count(i - 1) :]], 1)
            x = blk(x)
        return x

    def _fused_blocks(self, x: Tensor) -> Tensor:
        m = self._model
        b, npre = x.shape[0], m.num_prefix_tokens
        x = m.norm_pre(x)
        last = len(m.blocks) - 1
        cached = self._cached_prompt_kv()
        for i, blk in enumerate(m.blocks):
            if i == last and self._prompts_in_output:
                # The readout reads prompt outputs: only this block computes prompt rows.
                prompts = self._prompts_for(i, b)
                prompts = m.norm_pre(prompts) if i == 0 else prompts
                return blk(torch.cat([x[:, :npre], prompts.expand(b, -1, -1), x[:, npre:]], 1))
            if cached is not None:
                pk, pv = cached[i]
            else:
                prompts = self._prompts_for(i, b)
                pk, pv = _prompt_kv(blk, m.norm_pre(prompts) if i == 0 else prompts)
            x = self._fused_block(blk, x, pk, pv, i)
        return x

    @property
    def _prompts_in_output(self) -> bool:
        """Whether ``forward_features`` returns prompt tokens between prefix and patches."""
        if self.impl == "naive" or not self.config.deep:
            return True
        return self.config.readout == "patches+prompts" and self._last_count > 0

    @property
    def _last_count(self) -> int:
        return self.prompt_count(len(self._model.blocks) - 1 if self.config.deep else 0)

    def _fused_block(self, blk: nn.Module, x: Tensor, pk: Tensor, pv: Tensor, i: int) -> Tensor:
        """timm ``Block.forward`` on image tokens, their queries attending to ``[K_p; K]``."""
        attn = blk.attn
        b, n, _ = x.shape
        h = blk.norm1(x)
        qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        index = None if pk.shape[0] == 1 else torch.arange(b, device=x.device)
        if self.attention_hook is not None:
            o = self.attention_hook(i, q, k, v, pk, pv, index, attn.scale, self.backend)
        else:
            o, _ = prompt_attention(q, k, v, pk, pv, index, scale=attn.scale, backend=self.backend)
        o = attn.norm(o.transpose(1, 2).reshape(b, n, attn.num_heads * attn.head_dim))
        gate = getattr(attn, "gate", None)
        if gate is not None:
            o = o * gate(h).sigmoid()
        o = attn.proj_drop(attn.proj(o))
        x = x + blk.drop_path1(blk.ls1(o))
        return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))

    def _cached_prompt_kv(self) -> list[tuple[Tensor, Tensor]] | None:
        """Per-block prompt K/V, computed once and reused while nothing they depend on changes.

        Only at inference (eval mode, no autograd): training needs them in the graph. The key
        holds every tensor's storage pointer and version counter, so an optimizer step, a
        ``load_state_dict`` or a ``.to()`` invalidates it.
        """
        if self.training or torch.is_grad_enabled():
            return None
        key = self._kv_key()
        if self._kv_cache is None or self._kv_cache[0] != key:
            m = self._model
            kv = []
            for i, blk in enumerate(m.blocks):
                prompts = self._prompt_set(i).unsqueeze(0)
                kv.append(_prompt_kv(blk, m.norm_pre(prompts) if i == 0 else prompts))
            self._kv_cache = (key, kv)
        return self._kv_cache[1]

    def _kv_key(self) -> tuple:
        m = self._model
        tensors = [self.prompt_embeddings, *self.prompt_proj.parameters(), *m.norm_pre.parameters()]
        if self.deep_prompt_embeddings is not None:
            tensors.append(self.deep_prompt_embeddings)
        for blk in m.blocks:
            tensors += [
                *blk.norm1.parameters(),
                *blk.attn.qkv.parameters(),
                *blk.attn.k_norm.parameters(),
            ]
        device = tensors[0].device.type
        autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        return (autocast, *((t.data_ptr(), t._version, t.dtype) for t in tensors))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Readout, ``fc_norm`` and head, as timm's ``forward_head`` with prompts in mind."""
        m = self._model
        npre = m.num_prefix_tokens
        readout = self.config.readout
        if readout == "cls":
            x = x[:, 0]
        else:
            skip = self._last_count if readout == "patches" and self._prompts_in_output else 0
            x = x[:, npre + skip :].mean(dim=1)
        x = m.head_drop(m.fc_norm(x))
        return x if pre_logits else m.head(x)

    def forward(self, x: Tensor) -> Tensor:
        """Logits.

        Parameters
        ----------
        x : Tensor, shape (B, C, H, W)

        Returns
        -------
        Tensor, shape (B, num_classes)
        """
        return self.forward_head(self.forward_features(x))


def _prompt_kv(blk: nn.Module, prompts: Tensor) -> tuple[Tensor, Tensor]:
    """Keys and values of prompt tokens (T, P, D) in one block: (T, H, P, d) each."""
    return kv_from_normed(blk, blk.norm1(prompts))


def kv_from_normed(blk: nn.Module, h: Tensor) -> tuple[Tensor, Tensor]:
    """Keys and values from normalised prompt tokens ``h = LN1(p)`` (T, P, D): (T, H, P, d) each.

    Only the K and V rows of the qkv projection are applied; prompt queries are never needed.
    """
    attn = blk.attn
    t, p, _ = h.shape
    width = attn.num_heads * attn.head_dim
    bias = attn.qkv.bias[width:] if attn.qkv.bias is not None else None
    kv = F.linear(h, attn.qkv.weight[width:], bias)
    kv = kv.reshape(t, p, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    k, v = kv.unbind(0)
    return attn.k_norm(k), v


def vpt(
    model: nn.Module,
    num_prompts: int,
    deep: bool = True,
    dropout: float = 0.0,
    project: int = -1,
    readout: str | None = None,
    impl: str = "fused",
    backend: str | None = None,
    head_init: str = "vpt",
) -> PromptedViT:
    """Wrap a timm VisionTransformer with VPT prompts (official VPT semantics).

    Parameters
    ----------
    model : timm VisionTransformer
        Any ViT/DeiT-family model (class token or not, register tokens, ``no_embed_class``, token
        or avg pooling, ``fc_norm``, layer scale, qk-norm). Frozen and kept in eval mode.
    num_prompts : int
        Prompts per set, ≥ 0.
    deep : bool
        One prompt set per block (VPT-deep) rather than one before block 0 (shallow).
    dropout : float
        Prompt dropout, per image (the official deep demo uses 0.1).
    project : int
        -1 for no prompt projection, else the prompt width projected to the model width.
    readout : {"cls", "patches", "patches+prompts"}, optional
        Default: ``"cls"`` for ``global_pool="token"``, ``"patches+prompts"`` (the official
        avg-pool path) for ``"avg"``.
    impl : {"fused", "naive"}
        ``"naive"`` is the official computation, for comparison; same logits.
    backend : str, optional
        Prompt-attention backend (``"torch"``, ``"triton"``); default the best that fits.
    head_init : {"vpt", "keep"}
        Re-initialise the head as the official VPT code, or keep it.

    Returns
    -------
    PromptedViT
        Shares the model's parameters and state-dict names.
    """
    if readout is None:
        readout = "cls" if getattr(model, "global_pool", "token") == "token" else "patches+prompts"
    config = VPTConfig(num_prompts, deep, float(dropout), project, readout)
    return PromptedViT(model, config, impl=impl, backend=backend, head_init=head_init)


def config_dict(prompted: PromptedViT) -> dict[str, Any]:
    """JSON-ready description of a prompted model: its VPT config and the model it fits."""
    return {"vpt": asdict(prompted.config), "model": _model_signature(prompted.model)}
