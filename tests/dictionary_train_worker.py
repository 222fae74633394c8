"""A dictionary training run in its own process, for the kill -9 / resume test:
python -m tests.dictionary_train_worker CHECKPOINT_DIR (pauses 0.5 s after each checkpoint, so the
test can kill it between two)."""

import sys
import time

import jax
import numpy as np

from jaxcircuits import storage
from jaxcircuits.dictionaries import stream, train

KILL_OPTIONS = train.Options(kind="topk", width=24, k=3, lr=3e-3, steps=40, batch=32, buffer=128,
                             checkpoint_every=10, dead_tokens=256, devices=1)


def planted(n=2000, d=16, features=32, p=0.04, seed=0):
    """(true features [features, d] unit rows, activations [n, d]): each row a sum of the features
    active in it (each with probability p) times magnitudes in [0.5, 1.5)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(features, d))
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    mags = rng.uniform(0.5, 1.5, (n, features)) * (rng.random((n, features)) < p)
    return w, (mags @ w).astype(np.float32)


def kill_source():
    return stream.ArraySource(planted(n=512)[1], 16, rows=48)


if __name__ == "__main__":
    jax.config.update("jax_default_matmul_precision", "highest")
    save = storage.save_checkpoint

    def slow_save(*args):
        save(*args)
        time.sleep(0.5)
    storage.save_checkpoint = slow_save
    train.train(kill_source(), KILL_OPTIONS, sys.argv[1])
