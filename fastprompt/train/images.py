"""Reading one image of a dataset, and the errors that say why data cannot be used.

:class:`ImageError` says why an image could not be read, with advice for that cause: a missing
file (restore or remove it), one PIL cannot decode (replace or remove it), one over PIL's
decompression-bomb limit (shrink it, or raise the limit with ``FASTPROMPT_MAX_IMAGE_PIXELS``,
:func:`fastprompt._config.max_image_pixels`), or an error of the system (the system's own words;
retry, or check the file).

Raised in a :class:`~torch.utils.data.DataLoader` worker, an exception reaches the main process
as its type and its formatted traceback only (``torch._utils.ExceptionWrapper``: its attributes
are lost, the type is built again from the traceback text). So an :class:`ImageError` raised in a
worker writes its fields as one JSON line after its message, and the one built again from the
traceback reads them back: ``path``, ``cause`` and ``detail`` are attributes in the main process
too, and its message is one line again.
"""

from __future__ import annotations

import contextlib
import errno
import json
import threading
from collections.abc import Iterator
from typing import Any

from fastprompt import _config

__all__ = ["CAUSES", "DataError", "ImageError", "read_rgb"]

CAUSES = ("missing", "undecodable", "too-large", "system")
_FIELDS = "fastprompt-image-error: "


def _in_worker() -> bool:
    from torch.utils.data import get_worker_info

    return get_worker_info() is not None


def _raised_in_worker(text: str) -> bool:
    return text.startswith("Caught ") and "Original Traceback" in text


class DataError(ValueError):
    """A dataset that cannot be used: a bad path, no images, labels that do not fit."""

    def __str__(self) -> str:
        text = super().__str__()
        # Raised in a DataLoader worker, it comes back with the worker's traceback as its
        # message; its own message is what the traceback's last line says after its type.
        if _raised_in_worker(text):
            cls = type(self)
            head = f"{cls.__module__}.{cls.__qualname__}: "
            if head in text:
                return text.rsplit(head, 1)[1].strip()
        return text


class ImageError(DataError):
    """An image of a dataset that cannot be read.

    Parameters
    ----------
    path : str
        The image (or, built again from a worker's traceback, that traceback).
    cause : {"missing", "undecodable", "too-large", "system"}, optional
        Why (:data:`CAUSES`); None only when built from a worker's traceback.
    detail : str
        What the reader said (the exception's type and text).
    where : str
        Where the image is listed (`` (row 3 of data.csv)``), said after the path.

    Attributes
    ----------
    path, cause, detail, where
        As given (read back from a worker's traceback: None when it holds no fields).
    """

    def __init__(
        self, path: str, cause: str | None = None, detail: str = "", where: str = ""
    ) -> None:
        if cause is None:
            fields = _fields(path)
            path, cause = fields.get("path", path), fields.get("cause")
            detail, where = fields.get("detail", ""), fields.get("where", "")
        elif cause not in CAUSES:
            raise ValueError(f"ImageError: cause must be one of {CAUSES}, got {cause!r}")
        self.path, self.cause, self.detail, self.where = path, cause, detail, where
        super().__init__(path if cause is None else self._message())

    def _message(self) -> str:
        head = f"the image {self.path}{self.where}"
        if self.cause == "missing":
            return f"{head} does not exist ({self.detail}); restore it, or remove it from the data"
        if self.cause == "too-large":
            return (
                f"{head} is too large to decode safely ({self.detail}); shrink it, or if the "
                "images are trusted set FASTPROMPT_MAX_IMAGE_PIXELS in the environment to the "
                "pixel count of the largest or more (none: no limit), which replaces PIL's "
                "decompression-bomb limit for fastprompt's reads"
            )
        if self.cause == "system":
            return (
                f"{head} cannot be read: the system said {self.detail}; the file may be fine (a "
                "network file system, a busy or failing disk): retry, and if it persists check "
                "the file and its permissions"
            )
        return (
            f"{head} cannot be read ({self.detail}): PIL cannot decode it (damaged, truncated or "
            "not an image); replace or remove it"
        )

    def __str__(self) -> str:
        if self.cause is None:
            return DataError.__str__(self)
        message = self._message()
        if not _in_worker():
            return message
        fields = {"path": self.path, "cause": self.cause, "detail": self.detail}
        return f"{message}\n{_FIELDS}{json.dumps({**fields, 'where': self.where})}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.cause, self.detail, self.where))


def _fields(text: str) -> dict[str, str]:
    """The fields an :class:`ImageError` raised in a worker wrote into its traceback (the last
    such line: the traceback of an error raised while handling another holds both)."""
    if not _raised_in_worker(text) or _FIELDS not in text:
        return {}
    line = text.rsplit(_FIELDS, 1)[1].split("\n", 1)[0]
    try:
        fields = json.loads(line)
    except ValueError:
        return {}
    return fields if isinstance(fields, dict) and fields.get("cause") in CAUSES else {}


def _cause(e: BaseException) -> tuple[str, str]:
    """Why reading failed (:data:`CAUSES`) and what the reader said."""
    from PIL import Image

    if isinstance(e, FileNotFoundError):
        return "missing", f"{type(e).__name__}: {e.strerror}"
    if isinstance(e, Image.DecompressionBombError):
        return "too-large", f"{type(e).__name__}: {e}"
    if isinstance(e, OSError) and e.errno is not None:
        # An error of the system carries its errno; PIL's decoding errors are OSErrors without.
        name = errno.errorcode.get(e.errno, str(e.errno))
        return "system", f"{e.strerror or e} ({name})"
    return "undecodable", f"{type(e).__name__}: {e}"


# Reads with PIL's limit off now, and the limit the first of them found (threads may overlap).
_OFF_LOCK = threading.Lock()
_off: list[Any] = [0, None]


@contextlib.contextmanager
def _pil_limit(off: bool) -> Iterator[None]:
    """PIL's own limit off for one read (PIL has no per-call limit; a caller's setting is theirs
    again after the last read that overlapped: one thread's read may not put it back under
    another's, nor keep the None it found)."""
    from PIL import Image

    if not off:
        yield
        return
    with _OFF_LOCK:
        if _off[0] == 0:
            _off[1] = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
        _off[0] += 1
    try:
        yield
    finally:
        with _OFF_LOCK:
            _off[0] -= 1
            if _off[0] == 0:
                Image.MAX_IMAGE_PIXELS = _off[1]


def read_rgb(path: str, where: str = ""):
    """The image at ``path`` as an RGB PIL image.

    Larger than PIL's decompression-bomb limit, or than ``FASTPROMPT_MAX_IMAGE_PIXELS`` where it
    is set (:func:`fastprompt._config.max_image_pixels`, which replaces PIL's limit), it is
    refused before it is decoded.

    Raises
    ------
    ImageError
        It cannot be read: the cause and what to do about it.
    ValueError
        ``FASTPROMPT_MAX_IMAGE_PIXELS`` is malformed.
    """
    from PIL import Image

    given, limit = _config.max_image_pixels()
    try:
        # Opening reads the header only: the size is known before anything is decoded.
        with _pil_limit(given), Image.open(path) as img:
            pixels = img.width * img.height
            if limit is not None and pixels > limit:
                raise Image.DecompressionBombError(
                    f"Image size ({pixels} pixels) exceeds FASTPROMPT_MAX_IMAGE_PIXELS={limit}"
                )
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        cause, detail = _cause(e)
        raise ImageError(path, cause, detail, where) from None
