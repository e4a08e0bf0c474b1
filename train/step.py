"""The train step: thinker next-token loss (+ talker codec loss), gradient accumulation, AdamW, freezing,
NaN/inf skipping.

    trainer = Trainer(thinker, optimizer, mesh)                    # thinker only, or
    trainer = Trainer(thinker, optimizer, mesh, talker=Talker(...), talker_loss_weight=1.0)
    state = trainer.init_state(params, rng)           # params placed on the mesh, optimizer state beside them
    state, metrics = trainer.step(state, batch)       # batch: train.batches.to_global(...) ([k, B, L] leaves)

The thinker loss is sum(cross-entropy * loss_mask) / sum(loss_mask) over the whole step (all k microbatches),
so k accumulated microbatches give the gradient of the one big batch. Cross-entropy is computed in float32.
With a talker and a batch that carries the talker view (omni_jax/data/talker_view.py), the talker is run
teacher-forced on the thinker's hidden states H and merged embeddings E exactly as generation feeds it, and
loss = thinker loss + talker_loss_weight * talker loss, each normalised by its own token count over the whole
step. H and E reach the talker through stop_gradient unless talker_thinker_grad (then the talker loss also
trains the thinker).
Master weights are `param_dtype` (float32); the model computes in `dtype` (e.g. bfloat16).
A step whose loss or gradient is not finite leaves params and optimizer state untouched and is counted.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from omni_jax.kernels.target import resolve_platform
from omni_jax.models.linear_cross_entropy import linear_cross_entropy
from omni_jax.models.talker import Talker, init_talker
from omni_jax.models.thinker import Thinker, init_thinker
from omni_jax.sharding import logical_shardings, opt_state_shardings, rules_context
from train.optimizer import SkipsOnApply, clipped_adamw

# freezable module -> predicate on the param key path (below the top-level "thinker"/"talker" key)
MODULE_OF = {"audio_tower": "audio_encoder", "visual": "vision_encoder"}


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # [] int32: optimizer steps taken (skipped non-finite steps included)
    params: Any  # {"thinker": {...}} (+ "talker" when trained) master weights
    opt_state: Any
    rng: jax.Array  # [2] uint32 raw key data (the model has no dropout; kept for stochastic extensions)
    nonfinite_streak: jax.Array  # [] int32: consecutive non-finite steps
    nonfinite_total: jax.Array  # [] int32


def module_labels(params: Mapping[str, Any], freeze: Sequence[str]) -> Any:
    """Same tree as params, each leaf "frozen" or "train" (freeze: names from train.config.FREEZABLE)."""
    def label(path, _):
        keys = [getattr(k, "key", str(k)) for k in path]
        if keys[0] == "talker":
            module = "talker"
        elif keys[0] == "thinker":
            module = MODULE_OF.get(keys[1], "thinker_lm")
        else:
            module = keys[0]
        return "frozen" if module in freeze else "train"

    return jax.tree_util.tree_map_with_path(label, params)


def lr_schedule(learning_rate: float, warmup_steps: int, total_steps: int, end_lr_ratio: float):
    """Linear warmup from 0 to the peak, then cosine to peak * end_lr_ratio at total_steps."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=learning_rate, warmup_steps=max(warmup_steps, 0),
        decay_steps=max(total_steps, warmup_steps + 1), end_value=learning_rate * end_lr_ratio)


def make_optimizer(optim, total_steps: int, labels: Any) -> SkipsOnApply:
    """AdamW + warmup/cosine + global-norm clipping on trainable params (train.optimizer.clipped_adamw: one
    pass per leaf, `apply=` skips a step); zero updates for frozen ones (set_to_zero has no state)."""
    schedule = lr_schedule(optim.learning_rate, optim.warmup_steps, total_steps, optim.end_lr_ratio)
    adamw = clipped_adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay,
                          clip_norm=optim.clip_norm)
    return SkipsOnApply(*optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, labels))


def token_losses(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Masked float32 cross-entropy per token. logits [B, L, V], targets [B, L] -> [B, L]."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [B, L]
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return (log_z - target_logit) * loss_mask.astype(jnp.float32)


def _head_loss(module, hidden, micro, max_loss_tokens: int, loss_chunk: int = 0):
    """Inside Thinker.apply: (sum of masked token losses, loss tokens) from decoder hidden states [B, L, D].

    max_loss_tokens > 0: the lm_head only at (up to max_loss_tokens) loss positions. Most positions of an SFT
    batch carry no loss (prompts, media); skipping their [D, V] head matmul and vocab-wide softmax is the bulk
    of the step for a small model with Qwen's 152k vocabulary. The host checks that no microbatch has more
    loss tokens than max_loss_tokens (train.loop), so nothing is dropped.
    loss_chunk > 0: the lm_head and cross-entropy run fused over chunks of that many tokens
    (models.linear_cross_entropy), never holding the [tokens, V] float32 logits."""
    mask = micro["loss_mask"].astype(jnp.float32)  # [B, L]
    dim = hidden.shape[-1]
    flat_mask, targets = mask.reshape(-1), micro["targets"].reshape(-1).astype(jnp.int32)  # [B*L]
    flat_hidden = hidden.reshape(-1, dim)  # [B*L, D]
    if max_loss_tokens:
        index = jnp.nonzero(flat_mask > 0, size=max_loss_tokens, fill_value=0)[0]  # [M] first M loss positions
        valid = jnp.arange(max_loss_tokens) < jnp.sum(flat_mask > 0)
        flat_hidden = jnp.take(flat_hidden, index, axis=0)  # [M, D]
        weights, targets = jnp.where(valid, flat_mask[index], 0.0), targets[index]
    else:
        weights = flat_mask
    if loss_chunk:
        kernel = module.lm_head.variables["params"]["kernel"]  # [D, V]
        return linear_cross_entropy(flat_hidden, kernel, targets, weights, loss_chunk), flat_mask.sum()
    logits = module.lm_head(flat_hidden[None])  # [1, N, V]
    return token_losses(logits, targets[None], weights[None]).sum(), flat_mask.sum()


def _embeds_and_hidden(module, micro):
    """Inside Thinker.apply: merged input embeddings and post-norm decoder hidden states, both [B, L, D]."""
    embeds = module.embed_multimodal(micro["input_ids"], micro.get("audio"), micro.get("image"), micro.get("video"))
    hidden, _ = module.decoder(embeds, micro["positions"], micro["segment_ids"], None)
    return embeds, hidden


def _loss_at_positions(module, micro, max_loss_tokens: int, loss_chunk: int = 0):
    """Inside Thinker.apply: decoder hidden states, then the head loss (`_head_loss`)."""
    _, hidden = _embeds_and_hidden(module, micro)
    return _head_loss(module, hidden, micro, max_loss_tokens, loss_chunk)


def thinker_loss_sum(thinker: Thinker, params: Mapping[str, Any], micro: Mapping[str, Any],
                     max_loss_tokens: int = 0, loss_chunk: int = 0) -> tuple:
    """(sum of masked token losses, number of loss tokens) of one microbatch ([B, L] leaves).

    max_loss_tokens > 0: the lm_head runs only at the loss positions; loss_chunk > 0: fused chunked head
    (see `_head_loss`)."""
    return thinker.apply({"params": params["thinker"]}, micro, max_loss_tokens, loss_chunk,
                         method=_loss_at_positions)


def _thinker_parts(module, micro, max_loss_tokens: int, loss_chunk: int = 0):
    """Inside Thinker.apply: (loss sum, loss tokens, hidden [B, L, D], embeds [B, L, D], id_embeds [B, Lt, D]):
    the thinker loss of `thinker_loss_sum` plus what the talker is built from (post-norm hidden states, merged
    input embeddings, and the thinker embeddings of the talker view's thinker ids: speaker bos, tts_eos/pad)."""
    embeds, hidden = _embeds_and_hidden(module, micro)
    loss_sum, tokens = _head_loss(module, hidden, micro, max_loss_tokens, loss_chunk)
    id_embeds = module.embed(jnp.maximum(micro["talker_thinker_ids"], 0))  # [B, Lt, D]
    return loss_sum, tokens, hidden, embeds, id_embeds


def _gather_rows(x: jax.Array, index: jax.Array) -> jax.Array:
    """x [B, L, D] at index [B, Lt] (-1: zeros) -> [B, Lt, D]."""
    got = jnp.take_along_axis(x, jnp.maximum(index, 0)[..., None], axis=1)
    return jnp.where((index >= 0)[..., None], got, jnp.zeros((), x.dtype))


def talker_inputs(talker: Talker, talker_params, hidden, embeds, id_embeds, micro) -> jax.Array:
    """Teacher-forced talker inputs [B, Lt, E] (thinker space) from the talker view (talker_view.py):
    H[hidden_from] + E[embed_from] + embed_thinker(thinker_ids) + codec_embed(codec_ids), each where >= 0."""
    codec = talker.apply({"params": talker_params}, jnp.maximum(micro["talker_codec_ids"], 0),
                         method=Talker.embed_codec)  # [B, Lt, E]
    dtype = jnp.promote_types(hidden.dtype, codec.dtype)
    zero = jnp.zeros((), dtype)
    out = _gather_rows(hidden, micro["talker_hidden_from"]).astype(dtype)
    out = out + _gather_rows(embeds, micro["talker_embed_from"]).astype(dtype)
    out = out + jnp.where((micro["talker_thinker_ids"] >= 0)[..., None], id_embeds.astype(dtype), zero)
    return out + jnp.where((micro["talker_codec_ids"] >= 0)[..., None], codec.astype(dtype), zero)


def losses_with_talker(thinker: Thinker, talker: Talker, params, micro, max_loss_tokens: int = 0,
                       thinker_grad: bool = False, loss_chunk: int = 0) -> tuple:
    """(thinker loss sum, thinker tokens, talker loss sum, talker tokens) of one microbatch with talker keys."""
    loss_sum, tokens, hidden, embeds, id_embeds = thinker.apply(
        {"params": params["thinker"]}, micro, max_loss_tokens, loss_chunk, method=_thinker_parts)
    if not thinker_grad:
        hidden, embeds, id_embeds = jax.lax.stop_gradient((hidden, embeds, id_embeds))
    inputs = talker_inputs(talker, params["talker"], hidden, embeds, id_embeds, micro)  # [B, Lt, E]
    out = talker.apply({"params": params["talker"]}, inputs, micro["talker_positions"], micro["talker_segment_ids"])
    talker_losses = token_losses(out.logits, micro["talker_targets"], micro["talker_loss_mask"])  # [B, Lt]
    return loss_sum, tokens, talker_losses.sum(), micro["talker_loss_mask"].astype(jnp.float32).sum()


def has_talker_view(batch: Mapping[str, Any]) -> bool:
    return batch.get("talker_targets") is not None


class Trainer:
    """Jitted train and eval steps of the thinker (and talker) on a mesh (params sharded by their logical axes).

    talker: a Talker module trains with its codec loss on batches that carry the talker view; params then
    hold {"thinker", "talker"}. Batches without the view train the thinker only (the talker's gradient is 0)."""

    def __init__(self, thinker: Thinker, optimizer: optax.GradientTransformation, mesh: Mesh,
                 max_loss_tokens: int = 0, talker: Optional[Talker] = None, talker_loss_weight: float = 1.0,
                 talker_thinker_grad: bool = False, loss_chunk: int = 0, freeze: Sequence[str] = ()):
        # the program's target, resolved once from the mesh's devices (omni_jax.kernels.target)
        platform = resolve_platform(thinker.options, mesh)
        thinker = thinker.clone(options=thinker.options.replace(platform=platform))
        talker = None if talker is None else talker.clone(options=talker.options.replace(platform=platform))
        self.thinker = thinker
        self.loss_chunk = int(loss_chunk)  # > 0: fused chunked lm_head + cross-entropy (see _head_loss)
        self.talker = talker
        self.talker_loss_weight = float(talker_loss_weight)
        self.talker_thinker_grad = bool(talker_thinker_grad)
        self.max_loss_tokens = int(max_loss_tokens)  # per microbatch; 0 = lm_head on every position
        self.optimizer = optimizer
        self.mesh = mesh
        boxed = {"thinker": jax.eval_shape(lambda: init_thinker(thinker, jax.random.key(0)))["params"]}
        if talker is not None:
            boxed["talker"] = jax.eval_shape(lambda: init_talker(talker, jax.random.key(0)))["params"]
        self.param_shardings = {name: logical_shardings(tree, mesh) for name, tree in boxed.items()}
        abstract_params = {name: nn.meta.unbox(tree) for name, tree in boxed.items()}
        # freeze (names of train.config.FREEZABLE): those params are held off the differentiation path, so no
        # backward pass runs through a frozen encoder and none of its activations are kept for one; their
        # gradients are zeros (the optimizer must give them zero updates too: make_optimizer with the same labels)
        self.frozen = jax.tree_util.tree_map(lambda label: label == "frozen", module_labels(abstract_params, freeze))
        abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
        replicated = NamedSharding(mesh, PartitionSpec())
        self.state_shardings = TrainState(
            step=replicated, params=self.param_shardings,
            opt_state=opt_state_shardings(abstract_opt, abstract_params, self.param_shardings, mesh),
            rng=replicated, nonfinite_streak=replicated, nonfinite_total=replicated)
        self.abstract_state = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params, opt_state=abstract_opt,
                       rng=jax.ShapeDtypeStruct((2,), jnp.uint32), nonfinite_streak=jax.ShapeDtypeStruct((), jnp.int32),
                       nonfinite_total=jax.ShapeDtypeStruct((), jnp.int32)),
            self.state_shardings)
        self._steps: dict[Any, Any] = {}
        self._evals: dict[Any, Any] = {}

    # ------------------------------------------------------------------ state
    def init_state(self, params: Mapping[str, Any], seed: int = 0) -> TrainState:
        """Place params ({"thinker": ...} (+ "talker"), host or device arrays) on the mesh and build the optimizer
        state."""
        dtype = jnp.dtype(self.thinker.options.param_dtype)
        missing = sorted(set(self.param_shardings) - set(params))
        if missing:
            raise ValueError(f"init_state: params have no {missing} (this trainer trains "
                             f"{sorted(self.param_shardings)})")
        # a fresh copy in param_dtype, placed in its shards (the train step donates the state; the caller's
        # arrays stay valid)
        with jax.set_mesh(self.mesh):
            params = jax.jit(lambda p: jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), p),
                             out_shardings=self.param_shardings)({k: params[k] for k in self.param_shardings})
        with jax.set_mesh(self.mesh):
            opt_state = jax.jit(self.optimizer.init, out_shardings=self.state_shardings.opt_state)(params)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        put = lambda x: jax.device_put(x, replicated)  # noqa: E731
        return TrainState(step=put(jnp.zeros((), jnp.int32)), params=params, opt_state=opt_state,
                          rng=put(jax.random.key_data(jax.random.key(seed)).astype(jnp.uint32)),
                          nonfinite_streak=put(jnp.zeros((), jnp.int32)),
                          nonfinite_total=put(jnp.zeros((), jnp.int32)))

    # ------------------------------------------------------------------ losses
    def _with_talker(self, batch) -> bool:
        return self.talker is not None and has_talker_view(batch)

    def _micro_losses(self, params, micro) -> tuple:
        """(thinker loss sum, thinker tokens, talker loss sum, talker tokens) of one microbatch."""
        if self._with_talker(micro):
            return losses_with_talker(self.thinker, self.talker, params, micro, self.max_loss_tokens,
                                      self.talker_thinker_grad, self.loss_chunk)
        loss_sum, tokens = thinker_loss_sum(self.thinker, params, micro, self.max_loss_tokens, self.loss_chunk)
        return loss_sum, tokens, jnp.float32(0), jnp.float32(0)

    # ------------------------------------------------------------------ step
    def _grads(self, params, batch, talker_scale, denom):
        """Summed gradients of (thinker loss sum + talker_scale * talker loss sum) / denom and the four loss
        sums over the k stacked microbatches ([k, ...] leaves)."""
        def objective(p, m):
            p = jax.tree_util.tree_map(lambda x, frozen: jax.lax.stop_gradient(x) if frozen else x, p, self.frozen)
            sums = self._micro_losses(p, m)
            # dividing the objective (not the gradients afterwards) saves a pass over every gradient
            return (sums[0] + talker_scale * sums[2]) / denom, sums

        grad_fn = jax.value_and_grad(objective, has_aux=True)
        k = batch["input_ids"].shape[0]
        if k == 1:
            (_, sums), grads = grad_fn(params, jax.tree_util.tree_map(lambda x: x[0], batch))
            return grads, sums

        def accumulate(carry, micro):
            grads_acc, sums_acc = carry
            (_, sums), grads = grad_fn(params, micro)
            grads_acc = jax.tree_util.tree_map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)
            return (grads_acc, tuple(a + b for a, b in zip(sums_acc, sums))), None

        zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        (grads, sums), _ = jax.lax.scan(accumulate, (zeros, (jnp.float32(0),) * 4), batch)
        return grads, sums

    def _loss_and_grads(self, params, batch):
        """(loss, thinker loss, talker loss, tokens, talker tokens, gradients) of one step's global batch."""
        # Gradient of thinker_sum / T + w * talker_sum / T_talker (T: loss tokens of the whole step): the sum of
        # the k microbatches' gradients of (thinker_sum + (w T / T_talker) talker_sum) / T.
        denom = jnp.maximum(batch["loss_mask"].astype(jnp.float32).sum(), 1.0)
        talker_scale = jnp.float32(0)
        if self._with_talker(batch):
            talker_denom = jnp.maximum(batch["talker_loss_mask"].astype(jnp.float32).sum(), 1.0)
            talker_scale = self.talker_loss_weight * denom / talker_denom
        with rules_context():
            grads, (loss_sum, tokens, talker_sum, talker_tokens) = self._grads(params, batch, talker_scale, denom)
        thinker_loss = loss_sum / jnp.maximum(tokens, 1.0)
        talker_loss = talker_sum / jnp.maximum(talker_tokens, 1.0)
        loss = thinker_loss + self.talker_loss_weight * talker_loss
        return loss, thinker_loss, talker_loss, tokens, talker_tokens, grads

    def _train_step(self, state: TrainState, batch):
        loss, thinker_loss, talker_loss, tokens, talker_tokens, grads = self._loss_and_grads(state.params, batch)
        grad_norm = optax.tree.norm(grads)
        # every gradient is finite iff their global norm is (a norm that overflows float32, > 1.8e19, counts
        # as non-finite too); the optimizer leaves its state untouched when apply is False
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        if isinstance(self.optimizer, SkipsOnApply):  # make_optimizer's: skips inside its one pass per leaf
            updates, new_opt = self.optimizer.update(grads, state.opt_state, state.params, apply=finite)
        else:  # any other optax transformation: keep its old state on a skipped step
            updates, new_opt = optax.with_extra_args_support(self.optimizer).update(grads, state.opt_state,
                                                                                     state.params)
            new_opt = keep(new_opt, state.opt_state)
        new_params = keep(optax.apply_updates(state.params, updates), state.params)
        streak = jnp.where(finite, 0, state.nonfinite_streak + 1)
        new_state = TrainState(step=state.step + 1, params=new_params, opt_state=new_opt,
                               rng=jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0]),
                               nonfinite_streak=streak.astype(jnp.int32),
                               nonfinite_total=(state.nonfinite_total + (~finite)).astype(jnp.int32))
        metrics = {"loss": loss, "tokens": tokens, "grad_norm": grad_norm, "finite": finite,
                   "nonfinite_streak": new_state.nonfinite_streak}
        if self._with_talker(batch):
            metrics.update(thinker_loss=thinker_loss, talker_loss=talker_loss, talker_tokens=talker_tokens)
        return new_state, metrics

    def step_fn(self, batch: Mapping[str, Any]):
        """The jitted train step for batches of `batch`'s structure (arrays or ShapeDtypeStructs): state and batch
        shardings, the state donated, metrics replicated. Built once per structure; `omni-jax compile` lowers it."""
        from train.batches import batch_shardings

        key = jax.tree_util.tree_structure(batch)
        fn = self._steps.get(key)
        if fn is None:
            replicated = NamedSharding(self.mesh, PartitionSpec())
            fn = jax.jit(self._train_step,
                         in_shardings=(self.state_shardings, batch_shardings(batch, self.mesh)),
                         out_shardings=(self.state_shardings, replicated), donate_argnums=(0,))
            self._steps[key] = fn
        return fn

    def step(self, state: TrainState, batch: Mapping[str, Any]):
        """One optimizer step on a global batch (train.batches.to_global). Donates `state`."""
        fn = self.step_fn(batch)
        with jax.set_mesh(self.mesh):
            return fn(state, batch)

    def gradients(self, params, batch):
        """(gradients, loss) of one step on a global batch, without an update: what the optimizer of `step`
        receives (float32, summed over the k microbatches, placed like params). For checks of accumulation and
        sharding, where the gradient is the well-conditioned quantity to compare."""
        from train.batches import batch_shardings

        key = ("gradients", jax.tree_util.tree_structure(batch))
        fn = self._evals.get(key)
        if fn is None:
            replicated = NamedSharding(self.mesh, PartitionSpec())

            def grads_and_loss(params, batch):
                loss, *_, grads = self._loss_and_grads(params, batch)
                return grads, loss

            fn = jax.jit(grads_and_loss,
                         in_shardings=(self.param_shardings, batch_shardings(batch, self.mesh)),
                         out_shardings=(self.param_shardings, replicated))
            self._evals[key] = fn
        with jax.set_mesh(self.mesh):
            return fn(params, batch)

    # ------------------------------------------------------------------ eval loss
    def _eval_step(self, params, batch):
        def one(carry, micro):
            return tuple(a + b for a, b in zip(carry, self._micro_losses(params, micro))), None

        with rules_context():
            sums, _ = jax.lax.scan(one, (jnp.float32(0),) * 4, batch)
        loss_sum, tokens, talker_sum, talker_tokens = jax.lax.stop_gradient(sums)
        out = {"loss_sum": loss_sum, "tokens": tokens}
        if self._with_talker(batch):
            out.update(talker_loss_sum=talker_sum, talker_tokens=talker_tokens)
        return out

    def eval_loss_sums(self, params, batch):
        """{"loss_sum", "tokens"} (+ "talker_loss_sum", "talker_tokens") of a global batch (no update)."""
        from train.batches import batch_shardings

        key = jax.tree_util.tree_structure(batch)
        fn = self._evals.get(key)
        if fn is None:
            fn = jax.jit(self._eval_step, in_shardings=(self.param_shardings, batch_shardings(batch, self.mesh)),
                         out_shardings=NamedSharding(self.mesh, PartitionSpec()))
            self._evals[key] = fn
        with jax.set_mesh(self.mesh):
            return fn(params, batch)
