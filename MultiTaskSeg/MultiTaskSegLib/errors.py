"""User-facing errors: each says what is wrong and what to do about it."""


class MultiTaskSegError(Exception):
    """An error caused by the user's input (file, bundle, options), not a bug.

    The command line prints it as one line and exits non-zero; the Slicer
    module shows it in a message box.
    """


class InputVolumeError(MultiTaskSegError):
    """The input volume cannot be segmented (wrong dimension, NaN, unreadable …)."""


class BundleError(MultiTaskSegError):
    """The model bundle is missing, corrupt or of an unknown format."""


class DatasetError(MultiTaskSegError):
    """A training dataset is malformed (missing files, size mismatch …)."""


class CancelledError(Exception):
    """Raised from a progress callback to stop work; nothing is written."""
