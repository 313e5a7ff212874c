"""Keras, imported once with TensorFlow's start-up chatter kept off the terminal.

TensorFlow writes its C++ start-up lines (oneDNN, CUDA probing) to file descriptor 2 before
any log setting applies, so the import runs with that descriptor pointed at /dev/null.
Every module of probe gets Keras with `from ._keras import keras`, inside the functions
that need it, so that `import probe` and `probe --help` stay fast."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _import_tensorflow_quietly() -> None:
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow

        # probe builds many small models in one process (compare, tests): TensorFlow's
        # retracing warnings about that are not the user's concern
        tensorflow.get_logger().setLevel("ERROR")
    except ImportError:
        pass  # another Keras backend; keras itself reports what is missing
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


_import_tensorflow_quietly()

import keras  # noqa: E402

__all__ = ["keras"]
