"""Shared fixtures: the real embedded model is loaded once per test session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M-Instruct (f32) as a LoadedModel."""
    from cas_jax.loading import load_model

    return load_model()
