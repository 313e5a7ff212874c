"""The exceptions probe raises. Every message says what was expected, what was
received and how to fix it, so the command line can print it as one line."""


class ProbeError(Exception):
    """Base class of every error probe raises on purpose."""


class BackboneError(ProbeError):
    """An unknown backbone name or settings the backbone can not take."""


class WeightsError(ProbeError):
    """Backbone weights that can not be downloaded or loaded."""


class DatasetError(ProbeError):
    """A dataset directory, CSV or list file that can not be used."""


class InputError(DatasetError, ValueError):
    """Features or labels given to a head that it can not use. Also a `ValueError`, the
    type scikit-learn (and code written for its estimators) expects of bad input."""


class InputTypeError(InputError, TypeError):
    """Features that can not be converted to numbers (an object array holding a dict, say);
    also a `TypeError`, as numpy's conversion error is."""


class CacheError(ProbeError):
    """A feature cache that is missing, corrupt, locked or built with other settings."""


class UnsealedCacheError(CacheError):
    """A cache file without the whole-file checksum header (written by an older probe, or
    an HDF5 file of another program): probe does not parse it in its own process;
    `probe cache reseal` rewrites it sealed."""


class CacheMismatchError(CacheError):
    """A cache whose settings or source files differ from what was asked for."""


class SourceChangedError(CacheMismatchError):
    """The images a cache was built from changed since (`FeatureCache.check_source`).
    `changes` holds the `SourceChanges`; a command with --strict stops on it."""

    def __init__(self, message: str, changes=None):
        super().__init__(message)
        self.changes = changes


class NotFittedError(ProbeError, AttributeError):
    """A head used before `fit` (or `load`). The heads raise a subclass that is also
    scikit-learn's `NotFittedError` (`probe.heads.estimator.HeadNotFittedError`); it is
    defined there because importing scikit-learn here would slow every command's start."""


class RunError(ProbeError):
    """A run directory that is missing or incomplete."""


class FinetuneError(ProbeError):
    """Fine-tuning settings or a run that fine-tuning can not use."""
