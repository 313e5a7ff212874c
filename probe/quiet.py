"""Other libraries' warnings and log lines, kept off the terminal unless asked for.

What probe has to say reaches the user as progress events (rendered by the command line)
and as `ProbeError`s. TensorFlow, Keras, absl, OpenVINO and Ray also write on their own:
C++ start-up and log lines on file descriptor 2, Python warnings, log records. On a
successful run none of that is for a probe user, so the command line calls
`quiet_process()` at start-up, before any of them is imported; `probe --verbose` (or
`PROBE_VERBOSE=1`, or `set_verbose(True)` from Python) leaves them all as they are.

The Ray engine asks `verbose()` when it starts Ray (`ray_init_options`, `quiet_native_stderr`),
also for Python callers: a local Ray started for one extraction has nothing to say to them
either. Errors are never hidden: they are raised, and the command line prints them in one
line. This module imports nothing of probe's (the ground floor)."""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import logging
import os
import sys
import warnings
from typing import Any, Iterator

__all__ = ["VERBOSE_VARIABLE", "verbose", "set_verbose", "quiet_process", "quiet_loggers",
           "quiet_native_stderr", "ray_init_options"]

# Set by `--verbose` (and read by the processes probe starts, Ray's workers included).
VERBOSE_VARIABLE = "PROBE_VERBOSE"

# Read by the C++ parts when they start: TensorFlow's logging (3: errors only, which it
# raises as Python exceptions anyway), gRPC's and the backend of Ray's driver. Ray's "fatal"
# also drops its "constructor arguments in the object store" error line, which Ray Data's
# own actor pool triggers on every run (ray-project/ray#57733).
NATIVE_LOG_LEVELS = {"TF_CPP_MIN_LOG_LEVEL": "3", "GRPC_VERBOSITY": "ERROR",
                     "RAY_BACKEND_LOG_LEVEL": "fatal"}

# Their log records below ERROR are dropped.
LIBRARY_LOGGERS = ("tensorflow", "absl", "keras", "openvino", "ray", "ray.data", "h5py")

# Python warnings issued from these packages are dropped (a regular expression on the
# warning's module).
LIBRARY_MODULES = r"(tensorflow|tf_keras|keras|absl|openvino|ray|h5py|google\.protobuf|optree)(\.|$)"

# Warnings for developers, never for a command-line user, whichever module they name:
# libraries issue them with a stack level that points into probe's code.
DEVELOPER_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


def verbose() -> bool:
    """Whether other libraries' warnings and log lines are shown (`--verbose`)."""
    return os.environ.get(VERBOSE_VARIABLE, "").strip().lower() in ("1", "true", "yes", "on")


def set_verbose(on: bool) -> None:
    """Show (`True`) or keep quiet (`False`) other libraries' output from now on, in this
    process and the ones it starts (an environment variable, so Ray's workers see it)."""
    if on:
        os.environ[VERBOSE_VARIABLE] = "1"
    else:
        os.environ.pop(VERBOSE_VARIABLE, None)


def quiet_process(verbose: bool = False) -> None:
    """Keep TensorFlow's, Keras', absl's, OpenVINO's and Ray's warnings and log lines off
    the terminal for the rest of this process (the command line's start-up; call it before
    TensorFlow is imported). `verbose=True` only records the choice and changes nothing."""
    set_verbose(verbose)
    if verbose:
        return
    for name, level in NATIVE_LOG_LEVELS.items():
        os.environ.setdefault(name, level)  # a level the user set is theirs
    warnings.filterwarnings("ignore", module=LIBRARY_MODULES)
    for category in DEVELOPER_WARNINGS:
        warnings.filterwarnings("ignore", category=category)
    quiet_loggers(*LIBRARY_LOGGERS)
    if "tensorflow" in sys.modules:
        _quiet_tensorflow_logger(sys.modules["tensorflow"])
    elif not any(isinstance(finder, _QuietTensorFlowImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowImport())


def quiet_loggers(*names: str, level: int = logging.ERROR) -> None:
    """Drop these loggers' records below `level` (unless verbose)."""
    if verbose():
        return
    for name in names:
        logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """File descriptor 2 pointed at /dev/null for the block (unless verbose): for C++ code
    that writes there before any log setting applies. Python exceptions still propagate;
    anything else written to stderr meanwhile, by any thread, is lost."""
    if verbose():
        yield
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def ray_init_options() -> dict[str, Any]:
    """`ray.init` arguments: quiet, or with `verbose()` Ray's own logging and its workers'
    output forwarded to this process."""
    if verbose():
        return {"log_to_driver": True, "logging_level": logging.INFO}
    # read by the driver's core worker at ray.init
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", NATIVE_LOG_LEVELS["RAY_BACKEND_LOG_LEVEL"])
    _no_raylet_messages()
    return {"log_to_driver": False, "logging_level": logging.ERROR}


def _no_raylet_messages() -> None:
    """Keep the driver from printing the raylet's messages about dead workers (a traceback
    each, on stdout, whatever `log_to_driver` says): the run reports a failure as its
    own one line. Ray starts a thread with `listen_error_messages` at `ray.init`; where Ray
    has no such function (another version) nothing changes."""
    try:
        from ray._private import worker
    except ImportError:
        return
    if hasattr(worker, "listen_error_messages"):
        worker.listen_error_messages = lambda *args, **kwargs: None


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports TensorFlow, when a command first needs it, with file descriptor 2 pointed at
    /dev/null: TensorFlow writes its C++ start-up lines (CUDA probing, CPU features, absl's
    "All log messages before absl::InitializeLog()") there before any log setting applies.
    The import stays lazy, so `probe --help` stays fast."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once, and the real finders find it
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            self.loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__spec__.loader = module.__loader__ = self.loader
        with quiet_native_stderr():
            self.loader.exec_module(module)
        _quiet_tensorflow_logger(module)


def _quiet_tensorflow_logger(tensorflow) -> None:
    # probe builds many small models in one process (compare): TensorFlow's retracing
    # warnings about that are not the user's concern
    if not verbose():
        tensorflow.get_logger().setLevel("ERROR")
