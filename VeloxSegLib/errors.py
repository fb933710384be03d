"""Typed errors. The CLI turns them into one line on stderr and a non-zero exit code."""


class VeloxSegError(Exception):
    """Base class of every error VeloxSeg reports to a user (not a bug)."""

    exit_code = 1


class InputError(VeloxSegError):
    """A user-supplied image, mask, dataset or path is missing, unreadable or inconsistent."""

    exit_code = 2


class BundleError(VeloxSegError):
    """A model bundle is malformed, incomplete or unsafe."""

    exit_code = 3


class ConfigError(VeloxSegError, ValueError):
    """An invalid model or run configuration (e.g. a patch size the windows cannot tile)."""

    exit_code = 4


class Cancelled(VeloxSegError):
    """The run was cancelled (SIGINT/SIGTERM or a cancel callback)."""

    exit_code = 130
