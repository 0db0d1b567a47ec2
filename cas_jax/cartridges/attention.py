"""Composing a variable set of cartridges into one attention prefix, without recompiling.

Cartridges live in a `CartridgeBank`: fixed-capacity slots, each holding up to P_max tokens:
  keys, values: [N, L, P_max, K, Dh]   (after RoPE; token axis before head axis)
  lengths:      [N] int32              valid tokens of each slot (0 = empty slot)

Each batch row selects its own cartridges by slot index: `selection` [B, C] int32 with
`selected` [B, C] bool (False = unused selection slot). Shapes depend only on (N, P_max, C), so
changing which and how many cartridges are active changes array *values*, not shapes, and the
jitted forward does not recompile.

Composition geometry (`Geometry`; one value is used by training, evaluation, chat and the
server alike, so a cartridge is always read the way it was trained):
  * the selected cartridges' tokens are laid out in selection order, C * P_max prefix slots;
  * every cartridge keeps its own keys as trained (each was rotated with positions 0..P-1);
  * only the first active cartridge's token 0 (the attention sink) is visible (`routed_sink`:
    the best-routed one's); the sinks of the others are masked, so composing N cartridges
    shows one sink;
  * where the queries start (`num_prefix_tokens`, the prefix's "start" entry):
      serial    after every visible prefix token (the reference's concatenation): a query
                is C*P - (C-1) positions past a cartridge's first token when C are composed;
      parallel  after the longest composed cartridge: every cartridge sits at the distance
                from the queries it was trained at alone (APE's shared positions);
  * the prefix block's attention logits may be reshaped (APE-style, `temperature`, `scale`,
    `count_power`): logit / temperature + log(scale) - count_power * log(n_active), where
    n_active is the number of composed cartridges of the row (with `effective_count` = 1,
    the routed set's total weight instead: sum over its cartridges of exp(routing bias), so a
    set whose other cartridges are routed away weighs like the one left). The identity
    (1, 1, 0) leaves the prefix without "logit_scale"/"logit_bias" entries, so the forward is
    unchanged;
  * relevance routing (`relevance` = r > 0): each composed cartridge's logits also get
    -r * d, where d in [0, 1] is how far its document's retrieval score for the question
    falls below the best of the row's set: (best - score) / max(best - worst,
    relevance_floor * |best|). With relevance_floor 0 the worst of a set always gets -r;
    with 1 a set of near-equal scores (an uncertain retriever) is barely routed. The reader
    computes d from the documents' texts (`retrieval.Router`: its own, or the ones the store
    records) and passes it as `compose(cartridge_bias=)`. With `routed_sink` = 1 the one
    visible sink is the best-routed cartridge's, read with no reshaping at all.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cas_jax.cartridges.cartridge import Cartridge
# Where a prefix's queries start: defined with the prefix contract (`decoder`), offered here too.
from cas_jax.model.decoder import num_prefix_tokens  # noqa: F401

LAYOUTS = ("serial", "parallel")
_LOGIT_FIELDS = ("temperature", "scale", "count_power", "relevance", "relevance_floor",
                 "effective_count", "routed_sink")
"""A spec's key=value names."""


@dataclasses.dataclass(frozen=True)
class Geometry:
    """How composed cartridges stand before the queries (module doc). Static (hashable).

    layout: "serial" or "parallel". temperature: prefix logits are divided by it (< 1
    sharpens). scale: prefix attention weights are multiplied by it. count_power: they are
    further multiplied by n_active ** -count_power (1 = a composed set weighs what one
    cartridge weighs when each draws equal mass). relevance: a cartridge's weights are
    multiplied by exp(-relevance * d), d its document's normalised retrieval distance from
    the best of the set (module doc; 0 = off). relevance_floor: d's denominator is at least
    this share of the best score (module doc; 0 = the set's spread alone). effective_count:
    1 = count_power counts the set by its routed weights, sum exp(-relevance * d), not by its
    size (equal without routing; 0 = by its size). routed_sink: 1 = the one visible sink is
    the best-routed cartridge's (the highest cartridge_bias; ties: the first), and its logit
    is left as the model reads a cartridge alone (no scale, count or routing term); 0 = the
    first active cartridge's sink, biased with its cartridge.
    """

    layout: str = "serial"
    temperature: float = 1.0
    scale: float = 1.0
    count_power: float = 0.0
    relevance: float = 0.0
    relevance_floor: float = 0.0
    effective_count: float = 0.0
    routed_sink: float = 0.0

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"geometry layout {self.layout!r}: expected one of {LAYOUTS}")
        if not self.temperature > 0 or not self.scale > 0:
            raise ValueError(f"geometry temperature and scale must be > 0, got "
                             f"{self.temperature} and {self.scale}")
        if not self.relevance >= 0 or not self.relevance_floor >= 0:
            raise ValueError(f"geometry relevance and relevance_floor must be >= 0, got "
                             f"{self.relevance} and {self.relevance_floor}")
        for name in ("effective_count", "routed_sink"):
            if getattr(self, name) not in (0.0, 1.0):
                raise ValueError(f"geometry {name} is 0 (off) or 1 (on), got "
                                 f"{getattr(self, name)}")

    @property
    def reshapes_logits(self) -> bool:
        return (self.temperature, self.scale, self.count_power,
                self.relevance) != (1.0, 1.0, 0.0, 0.0)

    @property
    def reshapes_one(self) -> bool:
        """Whether a single cartridge is read otherwise than by the identity geometry (the
        layout and count_power change nothing for one cartridge)."""
        return (self.temperature, self.scale) != (1.0, 1.0)

    def __str__(self) -> str:
        """The spec `parse` reads: the layout, then any non-default logit settings."""
        extra = [f"{f}={getattr(self, f):g}" for f in _LOGIT_FIELDS
                 if getattr(self, f) != getattr(Geometry, f)]
        return ",".join([self.layout] + extra)

    @classmethod
    def parse(cls, spec: str) -> "Geometry":
        """"serial", "parallel" or e.g. "parallel,temperature=0.8,count_power=1"."""
        layout, *pairs = [p.strip() for p in spec.split(",") if p.strip()] or ["serial"]
        kw = {}
        names = _LOGIT_FIELDS
        for pair in pairs:
            name, eq, value = pair.partition("=")
            if not eq or name not in names:
                raise ValueError(f"geometry {spec!r}: {pair!r} is not one of "
                                 f"{', '.join(n + '=X' for n in names)}")
            try:
                kw[name] = float(value)
            except ValueError:
                raise ValueError(f"geometry {spec!r}: {name} needs a number, got {value!r}")
        return cls(layout, **kw)


def geometry_of(cartridges: Sequence[Cartridge]) -> Geometry:
    """The geometry `cartridges` were trained under (their meta); see `common_geometry`."""
    return common_geometry([(c.meta.doc_id, c.meta.geometry) for c in cartridges])


def common_geometry(trained: Sequence[tuple[str, str]]) -> Geometry:
    """The one geometry that (cartridge id, geometry spec it was trained under) pairs share;
    DEFAULT_GEOMETRY for none. Cartridges trained under different geometries are refused,
    naming them."""
    by: dict[str, list[str]] = {}
    for doc_id, spec in trained:
        by.setdefault(spec, []).append(doc_id)
    if len(by) > 1:
        raise ValueError(f"cartridges trained under different composition geometries {by}: "
                         "name the one to compose them by (--geometry)")
    return Geometry.parse(next(iter(by))) if by else DEFAULT_GEOMETRY


SERIAL = Geometry("serial")
PARALLEL = Geometry("parallel")
DEFAULT_GEOMETRY = SERIAL
"""The geometry every path uses unless told otherwise (what the recorded cartridges were
trained under)."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CartridgeBank:
    """keys/values [N, L, P_max, K, Dh]; lengths [N] int32."""

    keys: jax.Array
    values: jax.Array
    lengths: jax.Array

    @property
    def capacity(self) -> int:
        return self.keys.shape[0]

    @property
    def max_tokens(self) -> int:
        return self.keys.shape[2]


def bank_from_cartridges(cartridges: list[Cartridge], capacity: int | None = None,
                         max_tokens: int | None = None) -> CartridgeBank:
    """Stacks cartridges into a bank, padding tokens to max_tokens and slots to capacity."""
    if not cartridges:
        raise ValueError("bank_from_cartridges: need at least one cartridge")
    capacity = capacity or len(cartridges)
    max_tokens = max_tokens or max(c.num_tokens for c in cartridges)
    if len(cartridges) > capacity:
        raise ValueError(f"{len(cartridges)} cartridges exceed the bank capacity {capacity}")
    ref = cartridges[0].keys
    shape = (capacity, ref.shape[0], max_tokens, ref.shape[2], ref.shape[3])
    keys = np.zeros(shape, ref.dtype)
    values = np.zeros(shape, ref.dtype)
    lengths = np.zeros((capacity,), np.int32)
    for i, c in enumerate(cartridges):
        if c.num_tokens > max_tokens:
            raise ValueError(f"cartridge {c.meta.doc_id!r} has {c.num_tokens} tokens, bank slots "
                             f"hold {max_tokens}")
        keys[i, :, :c.num_tokens] = np.asarray(c.keys)
        values[i, :, :c.num_tokens] = np.asarray(c.values)
        lengths[i] = c.num_tokens
    return CartridgeBank(jnp.asarray(keys), jnp.asarray(values), jnp.asarray(lengths))


def compose(bank: CartridgeBank, selection: jax.Array, selected: jax.Array,
            geometry: Geometry = DEFAULT_GEOMETRY, cartridge_bias: jax.Array | None = None
            ) -> dict:
    """The prefix for `model.forward`: {k, v: [L, B, C*P_max, K, Dh], mask: [B, C*P_max],
    start: [B] int32 (the rows' first query position)}, plus logit_scale / logit_bias
    [B, C*P_max] float32 when `geometry` reshapes the prefix logits (module doc).

    selection [B, C] int32 slot ids into the bank; selected [B, C] bool. cartridge_bias
    [B, C] float32: added to every logit of that cartridge's slots (relevance routing: -r * d;
    required when geometry.relevance > 0). Differentiable in the bank's keys/values
    (gradients land in the selected slots only).
    """
    if geometry.relevance > 0 and cartridge_bias is None:
        raise ValueError(f"geometry {geometry} routes by relevance: its reader must pass "
                         f"cartridge_bias, computed from the documents' retrieval scores "
                         f"(evaluation does; the server and chat have no texts to score)")
    b, c = selection.shape
    _, n_layers, p, kh, dh = bank.keys.shape
    k = bank.keys[selection]  # [B, C, L, P, K, Dh]
    v = bank.values[selection]
    k = jnp.moveaxis(k, 2, 0).reshape(n_layers, b, c * p, kh, dh)
    v = jnp.moveaxis(v, 2, 0).reshape(n_layers, b, c * p, kh, dh)
    tok = jnp.arange(p)[None, None, :]
    if cartridge_bias is not None:
        cartridge_bias = jnp.asarray(cartridge_bias, jnp.float32)
    lengths = jnp.where(selected, bank.lengths[selection], 0)
    mask = tok < lengths[:, :, None]  # [B, C, P]
    active = lengths > 0
    if geometry.routed_sink and cartridge_bias is not None:
        routed = jnp.where(active, cartridge_bias, -jnp.inf)
        shows_sink = active & (jnp.arange(c)[None] == jnp.argmax(routed, axis=1)[:, None])
    else:
        shows_sink = jnp.cumsum(active, axis=1) == 1
    drop_sink = active & ~shows_sink
    mask = mask & ~((tok == 0) & drop_sink[:, :, None])
    if geometry.layout == "serial":
        start = jnp.sum(mask, axis=(1, 2))
    else:
        start = jnp.max(lengths, axis=1)
    prefix = {"k": k, "v": v, "mask": mask.reshape(b, c * p), "start": start.astype(jnp.int32)}
    if geometry.reshapes_logits or cartridge_bias is not None:
        if geometry.effective_count and cartridge_bias is not None:
            n_active = jnp.sum(jnp.where(active, jnp.exp(cartridge_bias), 0.0), axis=1)  # [B]
            n_active = jnp.where(jnp.any(active, axis=1), n_active, 1.0)
        else:
            n_active = jnp.maximum(jnp.sum(active, axis=1), 1).astype(jnp.float32)  # [B]
        bias = math.log(geometry.scale) - geometry.count_power * jnp.log(n_active)
        bias = jnp.broadcast_to(bias[:, None, None], (b, c, p))
        if cartridge_bias is not None:
            bias = bias + cartridge_bias[:, :, None]
        scale = jnp.full((b, c, p), 1.0 / geometry.temperature, jnp.float32)
        if geometry.routed_sink:
            sink = (tok == 0) & shows_sink[:, :, None]
            bias, scale = jnp.where(sink, 0.0, bias), jnp.where(sink, 1.0, scale)
        prefix["logit_scale"] = scale.reshape(b, c * p)
        prefix["logit_bias"] = bias.reshape(b, c * p).astype(jnp.float32)
    return prefix


def selection_arrays(selections: Sequence[Sequence[int]], slots: int,
                      biases: Sequence[Sequence[float]] | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """`compose`'s [N, slots] int32 bank slots, bool `selected` and float32 per-cartridge
    logit biases (None without `biases`) from per-row lists of bank slots (best first)."""
    sel = np.zeros((len(selections), slots), np.int32)
    on = np.zeros((len(selections), slots), bool)
    bias = None if biases is None else np.zeros((len(selections), slots), np.float32)
    for i, s in enumerate(selections):
        if len(s) > slots:
            raise ValueError(f"row {i} selects {len(s)} cartridges, only {slots} slots per row")
        sel[i, :len(s)] = s
        on[i, :len(s)] = True
        if bias is not None:
            if len(biases[i]) != len(s):
                raise ValueError(f"row {i}: {len(biases[i])} biases for {len(s)} cartridges")
            bias[i, :len(s)] = biases[i]
    return sel, on, bias


def compose_in_order(cartridges: list[Cartridge], geometry: Geometry = DEFAULT_GEOMETRY,
                     biases: Sequence[float] | None = None) -> dict | None:
    """The batch-1 prefix of `cartridges` composed in the order given (None for none): what
    `experiments.chat --cartridges` reads before its prompt. `biases`: one logit bias per
    cartridge (a routing geometry's, `compose`'s cartridge_bias)."""
    if not cartridges:
        return None
    n = len(cartridges)
    bias = None if biases is None else jnp.asarray(biases, jnp.float32)[None]
    return compose(bank_from_cartridges(cartridges), jnp.arange(n, dtype=jnp.int32)[None],
                   jnp.ones((1, n), bool), geometry, bias)


def visible_tokens(token_counts: Sequence[int]) -> int:
    """Prefix tokens a composed set shows, i.e. attends over (one sink for the set)."""
    return sum(token_counts) - max(0, len(token_counts) - 1)


def query_start(token_counts: Sequence[int], geometry: Geometry = DEFAULT_GEOMETRY) -> int:
    """Host-side twin of `compose`'s "start": the first query position after cartridges of
    `token_counts` tokens composed by `geometry` (0 for none)."""
    if not token_counts:
        return 0
    if geometry.layout == "serial":
        return visible_tokens(token_counts)
    return max(token_counts)
