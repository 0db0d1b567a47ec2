"""Hooks: both trainers call them after every N-th step with that step's StepInfo."""

import jax
import numpy as np
import pytest

from cas_jax.model import llama as model_lib
from cas_jax.model.loading import LoadedModel
from cas_jax.training import train as train_lib, train_collection as tc
from cas_jax.training.hooks import Hooks, StepInfo

import test_train as single
import test_train_collection as coll


def _recorder(hooks, every):
    seen = []
    hooks.add_hook(seen.append, every=every)
    return seen


def test_hooks_fire_on_multiples_and_build_the_info_only_when_due():
    hooks = Hooks()
    every2, every3 = _recorder(hooks, 2), _recorder(hooks, 3)
    built = []

    def make(step):
        built.append(step)
        return StepInfo(step=step, total_steps=7, loss=0.0, metrics={"loss": 0.0},
                        elapsed_s=0.0)

    for step in range(1, 8):
        hooks.fire(step, lambda: make(step))
    assert [i.step for i in every2] == [2, 4, 6] and [i.step for i in every3] == [3, 6]
    assert built == [2, 3, 4, 6]  # one StepInfo per due step, none on steps 1, 5, 7
    with pytest.raises(ValueError, match="every"):
        hooks.add_hook(print, every=0)


def test_single_trainer_calls_hooks_every_n_steps_with_that_steps_loss(tmp_path):
    params = single._params()
    examples = [single._example(params, i) for i in range(16)]
    mesh = train_lib.make_mesh(1)
    run = dict(config=single.CONFIG, train_config=single.TRAIN, mesh=mesh,
               checkpoint_dir=str(tmp_path / "ckpt"), save_every=2, log_every=1)
    hooks = Hooks()
    every2, every1 = _recorder(hooks, 2), _recorder(hooks, 1)
    reports = []
    train_lib.train(single._state(params)[1], params, single._iterator(examples),
                    num_steps=5, hooks=hooks, on_report=reports.append, **run)
    assert [i.step for i in every2] == [2, 4]
    assert [i.step for i in every1] == [1, 2, 3, 4, 5]
    assert all(i.total_steps == 5 and i.tokens is None and i.paging is None for i in every1)
    # log_every=1: each report's loss is its step's loss, as the hook's is.
    assert [i.loss for i in every1] == pytest.approx([r.loss for r in reports], rel=1e-6)
    assert [i.metrics["grad_norm"] for i in every1] == pytest.approx(
        [r.grad_norm for r in reports], rel=1e-6)
    # Resumed from the last checkpoint (step 5, the end): steps keep their numbers.
    hooks = Hooks()
    resumed = _recorder(hooks, 1)
    train_lib.train(single._state(params)[1], params, single._iterator(examples),
                    num_steps=7, hooks=hooks, **run)
    assert [i.step for i in resumed] == [6, 7]


@pytest.fixture
def collection(tmp_path):
    params = model_lib.init_params(coll.CFG, jax.random.PRNGKey(0))
    model = LoadedModel(coll.CFG, params, None, "tiny-model", "")
    coll._dataset(tmp_path / "data", np.random.default_rng(0))
    return model, str(tmp_path / "data"), train_lib.TrainConfig(lr=5e-2)


def test_collection_trainer_calls_hooks_every_n_steps_with_its_paging(collection, tmp_path):
    model, data, tcfg = collection
    root, plain = str(tmp_path / "h"), str(tmp_path / "p")
    coll._init_store(root, model, tcfg)
    coll._init_store(plain, model, tcfg)
    cfg = coll._cfg(steps=5, checkpoint_every=2)
    hooks = Hooks()
    every2, every1 = _recorder(hooks, 2), _recorder(hooks, 1)
    reports = []
    tc.train_collection(model, data, root, cfg, tcfg, on_report=reports.append, hooks=hooks)
    assert [i.step for i in every2] == [2, 4]
    assert [i.step for i in every1] == [1, 2, 3, 4, 5]
    assert [i.loss for i in every1] == pytest.approx([r.loss for r in reports], rel=1e-6)
    for info in every1:
        p = info.paging
        assert info.total_steps == 5 and info.tokens > 0
        assert p.updated and set(p.updated) <= set(p.acquired)
        assert 0 < p.pinned_bytes <= p.peak_resident_bytes <= cfg.budget_bytes
    stats = [i.paging.stats for i in every1]  # as the reports after the same steps saw them
    assert [s.hits + s.prefetch_hits for s in stats] == [r.hits for r in reports]
    assert [s.misses for s in stats] == [r.misses for r in reports]
    commits = [i.paging.commit_s for i in every1]  # checkpoints after steps 2, 4 and 5
    assert commits[0] == 0.0 and commits[1] > 0.0 and commits[1] == commits[2]
    assert commits[3] > commits[2] and commits[4] > commits[3]
    # Observing changes nothing: the same run without hooks trains the same cartridges.
    tc.train_collection(model, data, plain, cfg, tcfg)
    a, b = coll._all(root, model), coll._all(plain, model)
    for d in coll.DOCS:
        np.testing.assert_array_equal(a[d].keys, b[d].keys)
    # A resumed run numbers its steps from where it resumes.
    hooks = Hooks()
    resumed = _recorder(hooks, 1)
    tc.train_collection(model, data, root, coll._cfg(steps=7, checkpoint_every=2), tcfg,
                        hooks=hooks)
    assert [i.step for i in resumed] == [6, 7]
