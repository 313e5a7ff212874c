"""The global random state of Python, NumPy, Keras and TensorFlow, put back as it was
after code that seeds it (`keras.utils.set_random_seed`)."""

from __future__ import annotations

import contextlib
import random
from typing import Any, Iterator


@contextlib.contextmanager
def global_random_state_kept() -> Iterator[None]:
    """Code inside may seed the global generators (Keras' training draws from them); when
    the context ends, Python's `random`, NumPy's global generator, Keras' global seed and
    `SeedGenerator`, and TensorFlow's global seed are as they were."""
    import numpy as np
    from keras.src.backend.common import global_state
    from keras.src.random.seed_generator import GLOBAL_SEED_GENERATOR
    from keras.src.utils.rng_utils import GLOBAL_RANDOM_SEED

    python, numpy = random.getstate(), np.random.get_state()
    names = (GLOBAL_RANDOM_SEED, GLOBAL_SEED_GENERATOR)
    keras = {name: global_state.get_global_attribute(name) for name in names}
    tensorflow = _tensorflow_seed()
    try:
        yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)
        for name, value in keras.items():
            global_state.set_global_attribute(name, value)
        _set_tensorflow_seed(tensorflow)


def _tensorflow_context() -> Any:
    try:
        from tensorflow.python.eager import context
    except ImportError:  # another Keras backend, without TensorFlow
        return None
    return context.context()


def _tensorflow_seed() -> tuple[Any, Any] | None:
    """TensorFlow's global seed and the position of the generator it seeds (its op seeds)."""
    context = _tensorflow_context()
    if context is None:
        return None
    rng = getattr(context, "_rng", None)
    return context._seed, rng.getstate() if rng is not None else None


def _set_tensorflow_seed(saved: tuple[Any, Any] | None) -> None:
    context = _tensorflow_context()
    if context is None or saved is None:
        return
    # not tf.random.set_seed: it would restart the op seeds' generator from the seed
    context._seed, state = saved
    if state is None:
        context._rng = None
    else:
        context._rng = random.Random()
        context._rng.setstate(state)
