"""Typed errors: every failure a user can cause maps to one of these, with a message that names
the file, the field and what was expected. The CLI prints the message on one line."""

from __future__ import annotations


class ResRankExportError(Exception):
    """Base class; `exit_code` is what the CLI exits with."""

    exit_code = 1


class CheckpointError(ResRankExportError):
    """The checkpoint folder is missing something or holds an invalid value."""


class InputDataError(ResRankExportError):
    """A corpus, query or calibration file is malformed."""


class IndexFormatError(ResRankExportError):
    """An index folder is incomplete, malformed or was built with another encoder."""


class ParityError(ResRankExportError):
    """An exported graph does not reproduce the reference within tolerance."""


class MissingDependencyError(ResRankExportError):
    """An optional dependency is not installed; the message says how to install it."""

    exit_code = 2


class NotAvailableError(ResRankExportError):
    """The requested feature cannot run here (not implemented yet, or needs other hardware)."""

    exit_code = 2


class EngineError(ResRankExportError):
    """A TensorRT engine cannot be built, or a plan does not fit this GPU / TensorRT version."""


class OutputInUseError(ResRankExportError):
    """Another live process is writing the same output folder."""


class DiskSpaceError(ResRankExportError):
    """The file system has less free space than the output needs."""
