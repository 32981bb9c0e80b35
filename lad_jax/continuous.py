"""Continuous batching: a fixed number of decode slots, each refilled as soon as its row ends.

  sampler = ContinuousSampler(model, eos_ids=cfg.eos_token_ids, pad_id=pad_id, decode_slots=64)
  out = sampler.sample(params, prompts, key, group_size=8, max_new_tokens=1024,
                       on_rows=verify)          # the same SampleOutput as `Sampler.sample`

Lock-step batching (`sampler.Sampler`) decodes a chunk of rows until its longest row ends; with
long-tailed response lengths (RLVR's are) most rows sit finished for most of the steps. Here
the N = prompts x G rows wait in order and `decode_slots` rows decode at a time:

  1. insert: up to K = `refill_rows` waiting rows go into free slots of the slots' KV cache,
     which has one write index per row (`KVCache(per_row_index)`): their U distinct prompts
     (left-padded to the call's prompt bucket Tp) are prefilled once, each row gets a copy of
     its prompt's cache, and its first token is sampled;
  2. decode: a `lax.while_loop` of decode steps over every slot, each row at its own step,
     that stops once K slots are free (or, with no row waiting, once every row has ended);
  3. take: the ended rows are read back to the host, cut at stop strings, and handed to
     `on_rows` (e.g. the verifier pool) while the next rows decode; then 1 again.
  4. shrink: once no row waits, the slots halve (`compact`: the active rows move into half as
     many slots) whenever the active rows fit, down to `min_decode_slots`, so the long tail
     of the last rows does not pay for every slot at each step (as vLLM pads its running batch
     to the nearest captured batch size).

Same results as lock step, whatever slot a row lands in: a row's slot holds the layout of its
lock-step row (prompt in slots [0, Tp), response from Tp, the same RoPE positions), token i
of row r is drawn from the uniform of `fold_in(fold_in(key, i), r)` as in `Sampler`, and a row
attends only its own written slots (blocks read for longer rows are masked out exactly), so a
key gives the same tokens and log-probs up to float rounding of the batched matmuls.

Costs: a refill prefills each of its prompts once and copies the prompt's cache to its rows (as
lock step copies it to the G samples; a prompt whose rows fall in two refills is prefilled in
both); slots that ended wait for at most K - 1 others before they are refilled; one host round
trip (the ended flags) separates decode calls, and each slot count of the shrinking tail is
its own compiled decode.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lad_jax import sampler as sampler_lib
from lad_jax import sharding, xla_cpu
from lad_jax.models.decoder import KVCache, unstack_layer_params

Array = jax.Array


@flax.struct.dataclass
class Slots:
  """The decode slots (N of them) on device.

  cache: the slots' KV cache, N rows x (Tp + R) slots, one write index per row.
  tok_N: int32 each row's last token (fed to the model at the next step).
  step_N: int32 tokens sampled so far by the row in the slot.
  limit_N: int32 the most tokens of that row.
  row_N: int32 its index in the call's output (-1: the slot never held a row).
  done_N: bool the row ended (EOS or its limit) or the slot is empty.
  tokens_NR: [N, R] int32 its tokens so far (pad_id after them); logp_NR: [N, R] float32.
  """

  cache: KVCache
  tok_N: Array
  step_N: Array
  limit_N: Array
  row_N: Array
  done_N: Array
  tokens_NR: Array
  logp_NR: Array


# The Slots fields with one entry per slot (all but the cache).
_ROW_FIELDS = ("tok_N", "step_N", "limit_N", "row_N", "done_N", "tokens_NR", "logp_NR")


class Refill(NamedTuple):
  """K waiting rows for free slots (entries with slot_K = N are padding and dropped), and the U
  distinct prompts they sample (a prompt's G rows share one prefill).

  slot_K: int32 slots to fill; tokens_UT / mask_UT: the prompts left-padded to Tp;
  prompt_K: int32 each row's prompt in [0, U); row_K: int32 the rows' indices in the output;
  limit_K: int32 their token limits.
  """

  slot_K: Array
  tokens_UT: Array
  mask_UT: Array
  prompt_K: Array
  row_K: Array
  limit_K: Array


class Ended(NamedTuple):
  """What `take` reads of K slots: tokens [K, R], logp [K, R], length [K] (tokens sampled)."""

  tokens_KR: Array
  logp_KR: Array
  length_K: Array


class _Fns(NamedTuple):
  """The jitted functions of one (Tp, R, N, K, sampling params) key."""

  empty: Any
  insert: Any
  decode: Any
  take: Any
  compact: Any


Sampling = sampler_lib.Sampling


# ------------------------------------------------------------------------------------------------
# Device functions (pure; jitted by ContinuousSampler)


def empty_slots(smp: sampler_lib.Sampler, num_slots: int, prompt_len: int,
                response_len: int) -> Slots:
  """N empty slots (ended, no row) with a cache of prompt_len + response_len slots per row."""
  cache = KVCache.init(smp.cfg, batch_size=num_slots, max_length=prompt_len + response_len,
                       per_layer=smp.per_layer_cache, per_row_index=True)
  zeros_N = jnp.zeros((num_slots,), jnp.int32)
  return Slots(cache=cache, tok_N=zeros_N, step_N=zeros_N, limit_N=zeros_N + 1,
               row_N=zeros_N - 1, done_N=jnp.ones((num_slots,), bool),
               tokens_NR=jnp.full((num_slots, response_len), smp.pad_id, jnp.int32),
               logp_NR=jnp.zeros((num_slots, response_len), jnp.float32))


def place_rows(cache: KVCache, new: KVCache, slot_K: Array) -> KVCache:
  """`cache` (per-row index) with rows slot_K [K] replaced by the K rows of the prefilled
  `new` (its Tp slots at slots [0, Tp), later slots emptied, index Tp). Entries of slot_K out
  of range are dropped."""
  tp = new.max_length
  put = lambda x, v: x.at[slot_K].set(v, mode="drop")
  if cache.per_layer:
    k = tuple(c.at[slot_K, :, :, :tp].set(n, mode="drop") for c, n in zip(cache.k, new.k))
    v = tuple(c.at[slot_K, :, :tp, :].set(n, mode="drop") for c, n in zip(cache.v, new.v))
  else:
    k = cache.k.at[:, slot_K, :, :, :tp].set(new.k, mode="drop")
    v = cache.v.at[:, slot_K, :, :tp, :].set(new.v, mode="drop")
  seg_KS = jnp.pad(new.segment_ids, ((0, 0), (0, cache.max_length - tp)))
  return KVCache(k=k, v=v, segment_ids=put(cache.segment_ids, seg_KS),
                 index=put(cache.index, jnp.full(slot_K.shape, tp, cache.index.dtype)),
                 next_position=put(cache.next_position, new.next_position))


def insert(smp: sampler_lib.Sampler, sampling: Sampling, params: Any, slots: Slots,
           refill: Refill, key: Array) -> Slots:
  """Prefills the U refill prompts once, copies each row's prompt cache into its slot and
  samples the row's first token (step 0, from `fold_in(fold_in(key, 0), row)`, as `Sampler`:
  like lock step, a prompt's rows share its prefill and first-token logits)."""
  u, tp = refill.tokens_UT.shape
  cache = KVCache.init(smp.cfg, batch_size=u, max_length=tp, per_layer=smp.per_layer_cache)
  out = smp.model.apply({"params": params}, refill.tokens_UT, mask_BT=refill.mask_UT,
                        cache=cache, cache_is_empty=True, return_hidden=True,
                        compute_logits=False)
  logits_KV = smp.lm_logits(params, out.hidden[:, -1])[refill.prompt_K]
  k = refill.slot_K.shape[0]
  u_K = sampler_lib.row_uniforms(jax.random.fold_in(key, 0), refill.row_K)
  tok_K, lp_K = sampler_lib.sample_logits(logits_KV, u_K, **sampling._asdict())
  r = slots.tokens_NR.shape[1]
  first_KR = jnp.full((k, r), smp.pad_id, jnp.int32).at[:, 0].set(tok_K)
  logp_KR = jnp.zeros((k, r), jnp.float32).at[:, 0].set(lp_K)
  ended_K = sampler_lib.is_eos(tok_K, np.asarray(smp.eos_ids, np.int32)) | (refill.limit_K <= 1)
  put = lambda x, v: x.at[refill.slot_K].set(v, mode="drop")
  return Slots(cache=place_rows(slots.cache, out.cache.take_rows(refill.prompt_K),
                                refill.slot_K),
               tok_N=put(slots.tok_N, tok_K), step_N=put(slots.step_N, jnp.ones_like(tok_K)),
               limit_N=put(slots.limit_N, refill.limit_K), row_N=put(slots.row_N, refill.row_K),
               done_N=put(slots.done_N, ended_K), tokens_NR=put(slots.tokens_NR, first_KR),
               logp_NR=put(slots.logp_NR, logp_KR))


def _step(smp: sampler_lib.Sampler, sampling: Sampling, params: Any, key: Array,
          s: Slots) -> Slots:
  """One decode step of every slot: feeds each active row's last token, samples its next one
  (row r's token i from `fold_in(fold_in(key, i), r)`) and writes it at the row's own column."""
  n, r = s.tokens_NR.shape
  logits_NV, cache = smp.next_logits(params, s.cache, s.tok_N, s.done_N)
  draw = lambda i, row: jax.random.uniform(
      jax.random.fold_in(jax.random.fold_in(key, i), row), (), jnp.float32)
  u_N = jax.vmap(draw)(s.step_N, jnp.maximum(s.row_N, 0))
  tok_N, lp_N = sampler_lib.sample_logits(logits_NV, u_N, **sampling._asdict())
  active_N = ~s.done_N
  col_N = jnp.where(active_N, s.step_N, r)  # column r is out of range: finished rows keep theirs
  rows_N = jnp.arange(n)
  step_N = s.step_N + active_N.astype(jnp.int32)
  eos_N = sampler_lib.is_eos(tok_N, np.asarray(smp.eos_ids, np.int32))
  return s.replace(
      cache=cache, tok_N=jnp.where(active_N, tok_N, smp.pad_id), step_N=step_N,
      done_N=s.done_N | (active_N & (eos_N | (step_N >= s.limit_N))),
      tokens_NR=s.tokens_NR.at[rows_N, col_N].set(tok_N, mode="drop"),
      logp_NR=s.logp_NR.at[rows_N, col_N].set(lp_N, mode="drop"))


def decode(smp: sampler_lib.Sampler, sampling: Sampling, params: Any, slots: Slots,
           key: Array, free_target: Array) -> tuple[Slots, Array]:
  """Decode steps until at least `free_target` slots have ended (or none is active); returns
  the slots and their ended flags [N]."""
  smp.num_traces += 1
  if slots.cache.per_layer:
    params = unstack_layer_params(params, smp.cfg.num_layers)
  cond = lambda s: jnp.any(~s.done_N) & (jnp.sum(s.done_N) < free_target)
  slots = jax.lax.while_loop(cond, functools.partial(_step, smp, sampling, params, key), slots)
  return slots, slots.done_N


def take(slots: Slots, slot_K: Array) -> Ended:
  """The responses of slots slot_K [K] (ended rows, read back before their slots refill)."""
  return Ended(slots.tokens_NR[slot_K], slots.logp_NR[slot_K], slots.step_N[slot_K])


def compact(slots: Slots, keep_M: Array) -> Slots:
  """The M slots keep_M [M] of the N `slots`, in that order: each keeps its row, its steps
  and its cache row (a shrink of the slots once no row waits)."""
  rows = lambda x: jnp.take(x, keep_M, axis=0)
  return Slots(cache=slots.cache.take_rows(keep_M),
               **{f: rows(getattr(slots, f)) for f in _ROW_FIELDS})


# ------------------------------------------------------------------------------------------------
# The host loop


class _Outputs:
  """The call's responses on the host [N, R], filled as rows end."""

  def __init__(self, num_rows: int, response_len: int, pad_id: int):
    self.tokens_NR = np.full((num_rows, response_len), pad_id, np.int32)
    self.logp_NR = np.zeros((num_rows, response_len), np.float32)
    self.mask_NR = np.zeros((num_rows, response_len), bool)
    self.truncated_N = np.zeros((num_rows,), bool)


class ContinuousSampler(sampler_lib.Sampler):
  """`sampler.Sampler` with continuous batching (module docstring): the same arguments, plus

  Args:
    decode_slots: N, rows decoded at a time (the KV cache holds N x (Tp + R) slots; this
      replaces rows_per_call's chunks).
    refill_rows: K, slots refilled together (one prefill of their distinct prompts,
      `refill_prompts`); decoding pauses for a refill once K slots are free. None =
      max(1, decode_slots // 8).
    min_decode_slots: once no row waits, the slots halve while the active rows fit, down to
      this (rounded up to the mesh's batch shards); decode_slots = never shrink. None =
      max(1, decode_slots // 8).
  """

  def __init__(self, model: Any, *, decode_slots: int, refill_rows: Optional[int] = None,
               min_decode_slots: Optional[int] = None, **kwargs: Any):
    super().__init__(model, **kwargs)
    if decode_slots < 1:
      raise ValueError(f"decode_slots must be >= 1, got {decode_slots}.")
    refill_rows = max(1, decode_slots // 8) if refill_rows is None else refill_rows
    if not 1 <= refill_rows <= decode_slots:
      raise ValueError(f"refill_rows must be in [1, decode_slots={decode_slots}], got "
                       f"{refill_rows}.")
    self.decode_slots, self.refill_rows = int(decode_slots), int(refill_rows)
    least = max(1, decode_slots // 8) if min_decode_slots is None else min_decode_slots
    if not 1 <= least <= decode_slots:
      raise ValueError(f"min_decode_slots must be in [1, decode_slots={decode_slots}], got "
                       f"{least}.")
    shards = 1 if self.mesh is None else sharding.num_shards("batch", decode_slots, self.mesh)
    self.min_decode_slots = -(-int(least) // shards) * shards
    self._continuous: dict[tuple[Any, ...], _Fns] = {}

  def sample(self, params: Any, prompts: Sequence[Sequence[int]], key: Any, *, group_size: int,
             max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
             top_k: int = 0, row_limits: Optional[Sequence[int]] = None,
             on_rows: Optional[Callable[[sampler_lib.FinishedRows], None]] = None
             ) -> sampler_lib.SampleOutput:
    """As `Sampler.sample`; `on_rows` is called with each batch of rows as they end."""
    prompts, limits_N, prompt_len, response_len, sampling = self._setup(
        prompts, group_size, max_new_tokens, temperature, top_p, top_k, row_limits)
    num_rows = len(prompts) * group_size
    fns = self._fns_for(prompt_len, response_len, sampling)
    tokens_PT, mask_PT = sampler_lib.left_pad(prompts, prompt_len, self.pad_id)
    out = _Outputs(num_rows, response_len, self.pad_id)
    if self.mesh is not None:
      params = jax.device_put(params, self._param_shardings)
    with sharding.use_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
      self._drive(fns, params, sampler_lib.as_typed_key(key), tokens_PT, mask_PT, limits_N,
                  group_size, out, on_rows)
    return self._output(tokens_PT, mask_PT, group_size, out)

  def _drive(self, fns: _Fns, params: Any, key: Array, tokens_PT: np.ndarray,
             mask_PT: np.ndarray, limits_N: np.ndarray, group_size: int, out: _Outputs,
             on_rows: Optional[Callable[[sampler_lib.FinishedRows], None]]) -> None:
    """Refill, decode, take, until every row has ended (module docstring)."""
    n, k = len(limits_N), self.refill_rows
    occupant = np.full((self.decode_slots,), -1)  # row in each slot, -1: free
    next_row = 0
    slots = fns.empty()
    while True:
      if next_row == n:  # nothing waits: the active rows move into fewer slots
        slots, occupant = self._shrink(fns, slots, occupant)
      free = np.flatnonzero(occupant < 0)
      while free.size and next_row < n:
        rows = np.arange(next_row, min(n, next_row + k, next_row + free.size))
        slot = free[:rows.size]
        refill = self._refill(slot, rows, group_size, tokens_PT, mask_PT, limits_N[rows])
        slots = fns.insert(params, slots, refill, key)
        occupant[slot], next_row, free = rows, next_row + rows.size, free[rows.size:]
      if (occupant < 0).all():
        return
      target = k if next_row < n else self._free_target(occupant.size)
      slots, done_N = fns.decode(params, slots, key, np.int32(target))
      ended = np.flatnonzero(np.asarray(done_N) & (occupant >= 0))
      for start in range(0, ended.size, k):
        self._take(fns, slots, ended[start:start + k], occupant, out, on_rows)
      occupant[ended] = -1

  def _halved(self, num_slots: int) -> Optional[int]:
    """The slot count after a shrink of num_slots slots, None if they do not shrink."""
    half = num_slots // 2
    return half if half >= self.min_decode_slots and num_slots % 2 == 0 else None

  def _free_target(self, num_slots: int) -> int:
    """Ended slots a decode call waits for once no row waits: enough to shrink the slots, or
    all of them (num_slots + 1: until no row is active)."""
    half = self._halved(num_slots)
    return num_slots + 1 if half is None else num_slots - half

  def _shrink(self, fns: _Fns, slots: Slots, occupant: np.ndarray
              ) -> tuple[Slots, np.ndarray]:
    """Halves the slots while the active rows fit (`compact`); returns (slots, occupant)."""
    half = self._halved(occupant.size)
    while half is not None and (occupant >= 0).sum() <= half:
      order = np.argsort(occupant < 0, kind="stable")  # active slots first
      keep = order[:half].astype(np.int32)
      slots, occupant = fns.compact(slots, self._put(keep, (None,))), occupant[keep]
      half = self._halved(half)
    return slots, occupant

  def refill_prompts(self, group_size: int) -> int:
    """U, the most distinct prompts among refill_rows consecutive rows (G rows per prompt):
    the rows a refill prefills."""
    k = self.refill_rows
    return min(k, (k + group_size - 2) // group_size + 1)

  def _refill(self, slot: np.ndarray, rows: np.ndarray, group_size: int, tokens_PT: np.ndarray,
              mask_PT: np.ndarray, limits: np.ndarray) -> Refill:
    """A `Refill` of the given consecutive rows, padded to refill_rows entries (slot N:
    dropped) and to `refill_prompts` prompts."""
    first = rows[0] // group_size
    prompts = np.arange(first, rows[-1] // group_size + 1)
    pad, pad_u = self.refill_rows - rows.size, self.refill_prompts(group_size) - prompts.size
    fill = lambda x, v, n: np.concatenate([x, np.full((n,) + x.shape[1:], v, x.dtype)])
    refill = Refill(slot_K=fill(slot.astype(np.int32), self.decode_slots, pad),
                    tokens_UT=fill(tokens_PT[prompts], self.pad_id, pad_u),
                    mask_UT=fill(mask_PT[prompts], True, pad_u),
                    prompt_K=fill((rows // group_size - first).astype(np.int32), 0, pad),
                    row_K=fill(rows.astype(np.int32), 0, pad), limit_K=fill(limits, 1, pad))
    return jax.tree.map(lambda x: self._put(x, (None,) * x.ndim), refill)

  def _take(self, fns: _Fns, slots: Slots, slot: np.ndarray, occupant: np.ndarray,
            out: _Outputs, on_rows: Optional[Callable[[sampler_lib.FinishedRows], None]]
            ) -> None:
    """Reads ended slots back into `out` (stop strings cut) and hands their rows to on_rows."""
    padded = np.zeros((self.refill_rows,), np.int32)
    padded[:slot.size] = slot
    ended = jax.tree.map(lambda x: np.asarray(x)[:slot.size],
                         fns.take(slots, self._put(padded, (None,))))
    rows = occupant[slot]
    tok, lp = ended.tokens_KR.copy(), ended.logp_KR.copy()  # pad_id / 0 after the end
    msk = np.arange(tok.shape[1])[None, :] < ended.length_K[:, None]
    last = tok[np.arange(slot.size), np.maximum(ended.length_K - 1, 0)]
    trunc = ~np.isin(last, np.asarray(self.eos_ids, np.int32))
    if self.stop_strings:
      sampler_lib.cut_at_stop_strings(tok, msk, lp, trunc, stop_strings=self.stop_strings,
                                      tokenizer=self.tokenizer, pad_id=self.pad_id)
    out.tokens_NR[rows], out.logp_NR[rows], out.mask_NR[rows] = tok, lp, msk
    out.truncated_N[rows] = trunc
    if on_rows is not None:
      on_rows(sampler_lib.FinishedRows(rows=rows, response_tokens=tok,
                                       lengths=msk.sum(axis=1).astype(np.int32)))

  def _output(self, tokens_PT: np.ndarray, mask_PT: np.ndarray, group_size: int,
              out: _Outputs) -> sampler_lib.SampleOutput:
    """The host results as a `SampleOutput` (rows over the mesh's batch axes)."""
    def put(x):
      if self.mesh is None:
        return jnp.asarray(x)
      return sampler_lib.put_host(x, self._named(("batch",) + (None,) * (x.ndim - 1), x.shape))
    width = self.trimmed_width(out.mask_NR.sum(axis=1), out.tokens_NR.shape[1])
    out.tokens_NR, out.mask_NR = out.tokens_NR[:, :width], out.mask_NR[:, :width]
    out.logp_NR = out.logp_NR[:, :width]
    return sampler_lib.SampleOutput(
        prompt_tokens=put(np.repeat(tokens_PT, group_size, axis=0)),
        prompt_mask=put(np.repeat(mask_PT, group_size, axis=0)),
        response_tokens=put(out.tokens_NR), response_mask=put(out.mask_NR),
        logp=put(out.logp_NR), truncated=put(out.truncated_N),
        lengths=put(out.mask_NR.sum(axis=1).astype(np.int32)))

  # ---------------------------------------------------------------- compiled functions

  def _fns_for(self, prompt_len: int, response_len: int, sampling: Sampling) -> _Fns:
    """The jitted (empty, insert, decode, take) of one bucket / sampling key (cached)."""
    fn_key = (prompt_len, response_len) + tuple(sampling)
    if fn_key not in self._continuous:
      self._continuous[fn_key] = self._build_continuous(prompt_len, response_len, sampling)
    return self._continuous[fn_key]

  def _build_continuous(self, prompt_len: int, response_len: int, sampling: Sampling) -> _Fns:
    n = self.decode_slots
    empty = lambda: empty_slots(self, n, prompt_len, response_len)

    def insert_fn(params, slots, refill, key):
      self.num_traces += 1
      return insert(self, sampling, params, slots, refill, key)

    decode_fn = functools.partial(decode, self, sampling)
    opts = xla_cpu.sampler_options(self.platform)
    if self.mesh is None:
      return _Fns(jax.jit(empty), jax.jit(insert_fn, donate_argnums=(1,), compiler_options=opts),
                  jax.jit(decode_fn, donate_argnums=(1,), compiler_options=opts), jax.jit(take),
                  jax.jit(compact))
    slots_sh = self._slots_shardings(jax.eval_shape(empty))
    rep = NamedSharding(self.mesh, PartitionSpec())
    return _Fns(
        jax.jit(empty, out_shardings=slots_sh),
        jax.jit(insert_fn, in_shardings=(self._param_shardings, slots_sh, rep, rep),
                out_shardings=slots_sh, donate_argnums=(1,), compiler_options=opts),
        # The ended flags and taken rows come back replicated: every host reads them (the host
        # loop runs the same on every process).
        jax.jit(decode_fn, in_shardings=(self._param_shardings, slots_sh, rep, rep),
                out_shardings=(slots_sh, rep), donate_argnums=(1,), compiler_options=opts),
        jax.jit(take, in_shardings=(slots_sh, rep), out_shardings=rep),
        jax.jit(compact, in_shardings=(slots_sh, rep), out_shardings=slots_sh))

  def _slots_shardings(self, abstract: Slots) -> Slots:
    """Where the slots live on the mesh: rows over the batch axes, the cache as the sampler's."""
    cfg = self.cfg
    axes = KVCache.logical_axes(cfg.num_layers if self.per_layer_cache else None,
                                per_row_index=True)
    rows = lambda x: self._named(("batch",) + (None,) * (x.ndim - 1), x.shape)
    return Slots(cache=sharding.logical_shardings(abstract.cache, axes, self.mesh),
                 **{f: rows(getattr(abstract, f)) for f in _ROW_FIELDS})
