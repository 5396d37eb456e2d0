"""Errors a caller can fix. Each message says what is wrong and what to do instead.

The service maps these to 4xx problems; the command line prints the message on one line.
Anything else escaping a job is a bug in clipprune, not bad input.
"""


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
