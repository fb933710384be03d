"""The library's typed errors, re-exported so the extension reports them the same way.

``VeloxSegLib.errors`` has no heavy imports; if the library is missing (a broken install),
equivalent local classes keep error reporting working and the message says what to do.
"""
try:
    from VeloxSegLib.errors import BundleError, Cancelled, ConfigError, InputError, VeloxSegError
except ImportError:  # pragma: no cover - only when VeloxSegLib is not importable

    class VeloxSegError(Exception):
        exit_code = 1

    class InputError(VeloxSegError):
        exit_code = 2

    class BundleError(VeloxSegError):
        exit_code = 3

    class ConfigError(VeloxSegError, ValueError):
        exit_code = 4

    class Cancelled(VeloxSegError):
        exit_code = 130


__all__ = ["BundleError", "Cancelled", "ConfigError", "InputError", "VeloxSegError"]
