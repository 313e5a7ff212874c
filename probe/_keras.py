"""Keras, imported where probe needs it.

Every module of probe gets Keras with `from ._keras import keras`, inside the functions
that need it, so that `import probe` and `probe --help` stay fast. Importing leaves the
environment, stderr and logging as they are: keeping TensorFlow's start-up lines off the
terminal is the CLI's business (`cli.main`)."""

from __future__ import annotations

import keras

__all__ = ["keras"]
