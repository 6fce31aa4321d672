"""The Python API's loops: labels checked alike everywhere, epochs that make sense, loaders that
can be read again, condensed checkpoints that agree with themselves (issue 23, also found)."""

from __future__ import annotations

from fixtures import edit_metadata, tiny_vit
from harness import Case, Workspace, equals

SIZE = 16


def _api(name: str, *args, **kw):
    """``fastprompt.<name>(*args, **kw)``."""
    import fastprompt

    return getattr(fastprompt, name)(*args, **kw)


def _vpt(**kw):
    import fastprompt

    return fastprompt.vpt(tiny_vit(), 2, **kw)


def _images(n: int = 4):
    import torch

    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


def _score(labels):
    import torch

    import fastprompt

    return fastprompt.score_prompts(
        _vpt(), [(_images(len(labels)), torch.tensor(labels))], progress=False
    )


def _fit_int32(ws: Workspace):
    import torch

    import fastprompt

    losses = {}
    for dtype in (torch.int64, torch.int32, torch.uint8):
        torch.manual_seed(0)
        model = _vpt()
        batches = [(_images(), torch.tensor([0, 1, 2, 1], dtype=dtype))]
        losses[str(dtype)] = fastprompt.fit(model, batches, epochs=2, lr=0.1, progress=False)
    return losses


def _same_losses(ws: Workspace, losses) -> None:
    values = list(losses.values())
    assert all(v == values[0] for v in values), losses


def _swapped(ws: Workspace):
    import torch

    import fastprompt

    fastprompt.fit(_vpt(), [(torch.tensor([0, 1]), _images(2))], epochs=1, lr=0.1, progress=False)


def _one_shot(ws: Workspace):
    import torch

    import fastprompt

    def batches():
        for _ in range(2):
            yield _images(), torch.tensor([0, 1, 2, 0])

    fastprompt.prompt_condensation(_vpt(), batches(), keep=0.5, epochs=2, progress=False)


def _custom_loss_ignores_labels(ws: Workspace):
    import torch
    import torch.nn.functional as F

    import fastprompt

    def loss(logits, y):
        return F.cross_entropy(logits, y, ignore_index=-100, reduction="sum")

    batch = [(_images(), torch.full((4,), -100))]
    return fastprompt.score_prompts(_vpt(), batch, loss_fn=loss, progress=False)


def _condensed_checkpoint(ws: Workspace) -> None:
    import torch

    import fastprompt

    model = _vpt()
    keep = torch.zeros(2, 2, dtype=torch.bool)
    keep[0, 0] = keep[1, :] = True
    fastprompt.save_prompts(fastprompt.condense(model, keep), ws.path("condensed"))

    def edit(config):
        config["config"]["kept"][1] = [0]  # the counts say block 1 kept 2

    edit_metadata(ws.path("condensed"), edit)


def _pgn_one_channel(ws: Workspace):
    import torch

    import fastprompt

    model = fastprompt.pgn(tiny_vit(in_chans=1), num_prompts=2, library_size=4, resolution=32)
    return tuple(model(torch.randn(2, 1, SIZE, SIZE)).shape)


def _intermediates(**kw):
    return _vpt(deep=True).eval().forward_intermediates(_images(2), **kw)


CASES = [
    Case(
        "forward-intermediates-index-out-of-range",
        call=lambda ws: _intermediates(indices=[0, 5]),
        error=r"forward_intermediates: index 5 is out of range for 2 intermediates",
        exc="ValueError",
        names=["index 5"],
    ),
    Case(
        "forward-intermediates-attention-mask",
        call=lambda ws: _intermediates(attn_mask=_images(1)),
        error=r"forward_intermediates: attn_mask and is_causal are not supported",
        exc="ValueError",
    ),
    Case(
        "forward-intermediates-unknown-format",
        call=lambda ws: _intermediates(output_fmt="NHWC"),
        error=r"output_fmt must be one of \('NCHW', 'NLC'\) .*got 'NHWC'",
        exc="ValueError",
    ),
    Case(
        "forward-misspelled-keyword",
        call=lambda ws: _vpt()(_images(2), tsak=[0, 1]),
        error=r"forward\(\) got an unexpected keyword argument 'tsak'; a vpt model's forward "
        r"takes the images, nothing else",
        exc="TypeError",
        names=["tsak"],
    ),
    Case(
        "forward-intermediates-misspelled-keyword",
        call=lambda ws: _intermediates(stop_erly=True),
        error=r"'stop_erly' \(did you mean 'stop_early'\?\); the forward_intermediates of a timm "
        r"VisionTransformer",
        exc="TypeError",
        names=["stop_erly"],
    ),
    Case(
        "get-intermediate-layers-misspelled-keyword",
        call=lambda ws: _vpt(deep=True).eval().get_intermediate_layers(_images(2), reshap=True),
        error=r"get_intermediate_layers\(\) got an unexpected keyword argument 'reshap' \(did you "
        r"mean 'reshape'\?\); it takes x, n, reshape, return_prefix_tokens, norm, attn_mask",
        exc="TypeError",
        names=["reshap"],
    ),
    Case(
        "prune-intermediate-layers-refused",
        call=lambda ws: _vpt().prune_intermediate_layers([0]),
        error=r"prune_intermediate_layers is not supported on a prompted model",
        exc="NotImplementedError",
    ),
    Case(
        "score-prompts-float-labels",
        call=lambda ws: _score([0.0, 1.0]),
        error=r"score_prompts: labels must be integer class indices, got torch.float32",
        exc="LabelError",
    ),
    Case(
        "score-prompts-label-out-of-range",
        call=lambda ws: _score([0, 3]),
        error=r"score_prompts: label 3 does not fit the model's head of 3 classes",
        exc="LabelError",
    ),
    Case(
        "score-prompts-label-minus-one",
        call=lambda ws: _score([0, -1]),
        error=r"score_prompts: label -1 does not fit",
        exc="LabelError",
    ),
    Case(
        "score-prompts-all-labels-ignored",
        call=lambda ws: _score([-100, -100]),
        error=r"label -100 does not fit .*-100 is cross-entropy's ignore index",
        exc="LabelError",
    ),
    Case(
        "score-prompts-loss-ignores-every-label",
        call=_custom_loss_ignores_labels,
        error=r"every taylor score is zero",
        exc="ValueError",
    ),
    Case("fit-int32-and-uint8-labels", call=_fit_int32, check=_same_losses),
    Case(
        "fit-swapped-labels-and-images",
        call=_swapped,
        error=r"the batch looks like \(labels, images\)",
        exc="TypeError",
    ),
    Case(
        "fit-negative-epochs",
        call=lambda ws: _api("fit", _vpt(), [], epochs=-1, lr=0.1),
        error=r"fit: epochs must be >= 0 \(0 trains nothing\), got -1",
        exc="ValueError",
    ),
    Case(
        "finetune-negative-epochs",
        call=lambda ws: _api("finetune", _vpt(), [], epochs=-3),
        error=r"finetune: epochs must be >= 0 \(0 trains nothing\), got -3",
        exc="ValueError",
    ),
    Case(
        "prompt-condensation-one-shot-generator",
        call=_one_shot,
        error=r"prompt_condensation: the loader is a one-shot iterator \(generator\)",
        exc="TypeError",
    ),
    Case(
        "condensed-kept-list-disagrees-with-counts",
        call=lambda ws: _api("load_prompts", tiny_vit(), ws.path("condensed")),
        setup=_condensed_checkpoint,
        error=r"the kept list keeps \[1, 1\] prompts per block, but the config builds \[1, 2\]",
        exc="CheckpointError",
        names=["{case}/condensed/prompts.safetensors"],
    ),
    Case(
        "pgn-on-a-one-channel-vit",
        call=_pgn_one_channel,
        check=equals((2, 3)),
    ),
]
