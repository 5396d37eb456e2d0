"""Errors a caller can fix. Each message says what is wrong and what to do instead.

The service maps these to 4xx problems; the command line prints the message on one line.
Anything else escaping a job is a bug in clipprune, not bad input.
"""

import re


class InputError(ValueError):
    """Bad input from the caller."""

    title = "Invalid input"


class InvalidModelError(InputError):
    """The bytes are not a valid ONNX model."""

    title = "Invalid ONNX model"


class UnsafeModelError(InputError):
    """A valid model that clipprune refuses to open: external data, unknown domains, limits."""

    title = "Model refused"


class UnsupportedModelError(InputError):
    """A valid model that the requested operation cannot handle safely."""

    title = "Unsupported model for this operation"


class InvalidDataError(InputError):
    """An eval/train data file that cannot be used."""

    title = "Invalid data file"


MAX_MESSAGE = 300  # characters: an error or a note a person reads in one go


def cut_list(before: str, items: list[str], after: str = "", limit: int = MAX_MESSAGE) -> str:
    """before + as many of `items` as fit, comma-separated, + "… and N more" + after, in at
    most `limit` characters: a long list is cut, never the words around it."""
    shown: list[str] = []
    for index, item in enumerate(items):
        rest = len(items) - index - 1
        more = f" … and {rest} more" if rest else ""
        candidate = ", ".join([*shown, item])
        if len(before) + len(candidate) + len(more) + len(after) > limit:
            more = f"… and {len(items) - index} more"
            return before + ", ".join(shown) + (" " if shown else "") + more + after
        shown.append(item)
    return before + ", ".join(shown) + after


def one_line(text: str, limit: int = MAX_MESSAGE) -> str:
    """`text` on one line of at most `limit` characters, cut with an ellipsis."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def first_line(error: BaseException | str, limit: int = 160) -> str:
    """The first line of an error from a library (onnxruntime, onnx), cut to `limit`
    characters: their messages can run to pages."""
    lines = str(error).strip().splitlines()
    return one_line(lines[0] if lines else type(error).__name__, limit)


def onnxruntime_reason(error: BaseException) -> str:
    """onnxruntime's message without its error codes, the path of the file it loaded (a
    scratch file of the job's) and the C++ source line and signature that raised it: none of
    them says anything to the caller."""
    reason = str(error) or type(error).__name__
    reason = re.sub(r"\[ONNXRuntimeError\] : \d+ : \w+ : ", "", reason)
    reason = re.sub(r"/onnxruntime_src/\S+:\d+ [^(]*\([^)]*\) ?", "", reason)
    return re.sub(r"Load model from \S* ?failed: ?", "", reason)
