"""The collection trainer's jitted step: one optimisation step over a bank of cartridges.

The step bank holds N slots (`collection_plan`: N = batch * (1 + k_max), zero-padded), each a
cartridge's {frozen, trainable} parts and its own optimizer state, stacked on a leading slot
axis. The optimizer is applied vmapped over the slots, so every cartridge keeps its own Adam
moments and step count and is clipped on its own; the sink token is frozen by the optimizer
(see `train.make_optimizer`). Slots the step may not train are wrapped in stop_gradient and
come back unchanged, optimizer state included.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from cas_jax.model.loading import LoadedModel
from cas_jax.training import train


def _slot_mask(mask: jax.Array, leaf: jax.Array) -> jax.Array:
    return mask.reshape(mask.shape + (1,) * (leaf.ndim - 1))


def make_collection_step(model: LoadedModel, train_config: train.TrainConfig,
                         optimizer: optax.GradientTransformation, mesh) -> Callable:
    """(parts [N,...], opt_state [N,...], trainable [N] bool, params, batch, quiet) ->
    (parts, opt_state, metrics), jitted with the batch sharded over "data" and the rest
    replicated; parts and opt_state are donated. Slots with trainable False come back unchanged.
    quiet (static): the batch's teacher is replaced by the model with no document
    (`train.closed_book_targets`), for a quiet step of the distractor schedule.
    """
    def step(parts, opt_state, trainable, params, batch, quiet):
        if quiet:
            batch = train.closed_book_targets(params, batch, config=model.config)

        def loss(p):
            p = jax.tree.map(lambda x: jnp.where(_slot_mask(trainable, x), x,
                                                 jax.lax.stop_gradient(x)), p)
            return train.loss_fn(p, params, batch, config=model.config,
                                 train_config=train_config)

        (value, count), grads = jax.value_and_grad(loss, has_aux=True)(parts)
        updates, new_opt = jax.vmap(optimizer.update)(grads, opt_state, parts)
        new_parts = optax.apply_updates(parts, updates)

        def keep(new, old):
            return jnp.where(_slot_mask(trainable, new), new, old)

        return (jax.tree.map(keep, new_parts, parts), jax.tree.map(keep, new_opt, opt_state),
                {"loss": value, "loss_tokens": count,
                 "grad_norm": optax.global_norm(grads["trainable"])})

    rep = train.replicated(mesh)
    return jax.jit(step, in_shardings=(rep, rep, rep, rep, train.batch_sharding(mesh)),
                   out_shardings=(rep, rep, rep), donate_argnums=(0, 1), static_argnums=(5,))
