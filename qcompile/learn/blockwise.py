"""The block-wise learning engine: train a pass's parameters one decoder block at a time against the float model.

Shared by every learned weight pass (``lwc``, ``lsi``, ``sde``; CLL is an option of this engine). The scheme is
OmniQuant's (arXiv 2308.13137), which LSI and CQE+ build on:

* Two streams of calibration activations run side by side: ``X`` through the float blocks and ``X_hat``
  through the already-quantized ones (both start at the embeddings of the calibration windows). Block ``l`` is
  trained so that its quantized version on ``X_hat`` reproduces the float block on ``X``:
  ``L_l = ||B_l(X) - B_hat_l(X_hat)||^2 / ||B_l(X)||^2`` (relative, so one learning rate suits shallow and deep
  blocks whose residual streams differ by orders of magnitude).
* **CLL** (Cross-layer Learning, CQE+; ``cll_window = k > 0``): the loss also follows the block's output through
  the next ``k`` float blocks,
  ``+ cll_weight * sum_j ||B_{l+j}..B_{l+1}(B_l(X)) - B_{l+j}..B_{l+1}(B_hat_l(X_hat))||^2`` (relative too), so block
  ``l`` is not tuned greedily for its own output but for what the following blocks make of it. The later blocks are
  frozen and float here (their run-time quantizers off); gradients flow through them to block ``l``'s parameters. Costs
  roughly ``1 + k`` times the training compute.
* Each target linear of the block gets a :class:`~qcompile.learn.weights.LearnedWeight` (through
  ``torch.nn.utils.parametrize``), so the layer's own forward computes with the fake-quantized weight; rounding
  is straight-through. Run-time quantizers installed by earlier passes (activations, KV cache) stay on in the
  quantized stream and off in the float one (:func:`runtime_quant_disabled`).
* After ``epochs`` passes over the windows (``batch_size`` windows per AdamW step, shuffled with a per-block
  seed, so a resumed run trains later blocks exactly as an uninterrupted one), the block is frozen: every
  parametrization is exported to a :class:`QuantizedWeight` and set on the handle (so the module computes
  exactly what the graph will), and both streams advance through the block.
* **Memory**: one block's activations for backward (``1 + k`` blocks with CLL) plus the cached streams (two, plus
  ``k`` CLL targets) of ``samples x seq_len x hidden`` floats; ``offload_activations`` keeps the streams on CPU.
* **Resume**: with ``state_dir`` the quantized weights of each finished block (and the trained parameters they
  came from) are saved in ``state_dir/<pass>`` (``block_XXX.safetensors`` plus a fingerprint of the
  configuration); a later run with the same configuration loads the finished blocks instead of training them and
  continues with the next. Fields named ``e2e_*`` configure a pass's later end-to-end stage, not this training,
  so they are left out of the fingerprint.
* **Trained parameters** of every linear stay on the handle (``handle.learned_params``, CPU) after the block is
  frozen when the pass asks for them (``keep_learned``): its end-to-end stage (sde's ``e2e_epochs``) continues
  from exactly them. Otherwise they are dropped with the block (3.6 % of the weights' size for sde: gigabytes on
  a large model); ``state_dir`` saves them either way, so a saved state resumes into an end-to-end stage.
* **Activation clipping** (``act_clip``): where an ``act_quant`` step ran before, the block's activation quantizers
  also get one learnable clip ratio per quantized input (BiSup's fine-grained activation clipping,
  :class:`~qcompile.learn.extras.ActivationClipping`), trained with the weights' parameters and frozen with them
  into the quantizers' ``clip_ratio``: a constant the exported graph already holds.
* lm_head, when targeted, is quantized by RTN at the end (a block-wise loss does not reach it).
* **After an earlier weight pass** (e.g. ``gptq`` then ``sde``): the linears hold that pass's dequantized weights,
  which is where the learned parametrization starts (its base ``W``), while the float stream and the CLL
  look-ahead run the float originals (``handle.float_weights``), swapped in for the duration of each float run
  (:class:`_FloatOriginals`). The target is always the float model, whatever ran before.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from qcompile.data import CalibrationConfig
from qcompile.errors import QCompileError, RecipeError, require_int, require_number
from qcompile.learn.capture import LayerwiseRunner, _layer_output, on_device, resolve_device
from qcompile.learn.extras import ActivationClipping, clip_summary, set_clip_ratios
from qcompile.learn.weights import LearnedWeight
from qcompile.models.handle import ModelHandle
from qcompile.quant.activations import runtime_quant_disabled
from qcompile.quant.grid import QuantizedWeight, QuantSpec, search_clip
from qcompile.quant.targets import WeightQuantConfig, targets


# learning-rate schedules of the learned passes (this engine, and spinquant's Cayley SGD)
LR_SCHEDULES = ("cosine", "constant")


@dataclass
class BlockwiseConfig(WeightQuantConfig, CalibrationConfig):
    epochs: int = 10
    batch_size: int = 4  # calibration windows per optimiser step
    lr_clip: float = 1e-2  # learned clipping (OmniQuant's lwc_lr)
    lr_adjust: float = 1e-3  # singular-value / low-rank adjustments (in units of the singular values)
    lr_magnitude: float = 1e-3
    weight_decay: float = 0.0
    # "constant": OmniQuant's setting; "cosine": every learning rate decays to 0 over the block's steps (1.6 % worse
    # ppl than constant for CQE+ W4 in a CPU proxy, docs/BENCHMARKS.md "Learned passes")
    lr_schedule: str = "constant"
    cll_window: int = 0  # CLL: follow each block's output through this many later blocks (0 = greedy)
    cll_weight: float = 1.0
    penalty: float = 0.0  # weight of sum ||W' - W||^2/||W||^2 over the block's linears (SDE's regulariser)
    # learn one clip ratio per quantized activation of the block with its weights (BiSup's fine-grained activation
    # clipping, qcompile.learn.extras); needs an act_quant step earlier in the recipe
    act_clip: bool = False
    lr_act_clip: float = 1e-3  # no weight decay on the ratios (it would pull them to the range's floor)
    device: str | None = None
    offload_activations: bool = False
    tf32: bool = True  # TF32 matmuls on CUDA while training (the exported weights are exact either way)
    state_dir: str | None = None  # save finished blocks here; resume from it
    seed: int = 0

    def __post_init__(self):
        for f in ("epochs", "batch_size"):
            require_int(getattr(self, f), f, minimum=1)
        require_int(self.cll_window, "cll_window")
        for f in ("lr_clip", "lr_adjust", "lr_magnitude", "lr_act_clip"):
            require_number(getattr(self, f), f)
        for f in ("weight_decay", "cll_weight", "penalty"):
            require_number(getattr(self, f), f, positive=False)
        if self.lr_schedule not in LR_SCHEDULES:
            raise RecipeError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")

    def learning_rates(self) -> dict[str, float]:
        return {"clip": self.lr_clip, "adjust": self.lr_adjust, "magnitude": self.lr_magnitude}


MakeParam = Callable[[str, str, nn.Linear, QuantSpec], LearnedWeight]


def relative_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    target = target.float()
    return (pred.float() - target).pow(2).mean() / target.pow(2).mean().clamp(min=1e-12)


# -- resumable state --------------------------------------------------------------------------------------
def fingerprint(handle: ModelHandle, config, method: str, ignore: tuple[str, ...] = ()) -> str:
    """What saved training state depends on: method, configuration (minus where state lives and ``ignore``),
    model and earlier passes."""
    skip = {"state_dir", "device", "offload_activations", *ignore}
    cfg = {k: v for k, v in dataclasses.asdict(config).items() if k not in skip and not k.startswith("e2e_")}
    blob = json.dumps({"method": method, "config": cfg, "source": handle.source_sha256 or handle.source,
                       "passes": handle.applied_passes}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class BlockState:
    """``state_dir/block_XXX.safetensors`` (integers, scales, zero points of one block, and the trained parameters
    behind them) + ``state.json``."""

    def __init__(self, directory: str | None, key: str):
        self.dir = Path(directory) if directory else None
        self.key = key
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "state.json"
        if meta.is_file():
            saved = json.loads(meta.read_text()).get("fingerprint")
            if saved != key:
                raise QCompileError(
                    f"training state in {self.dir} belongs to another configuration (fingerprint {saved}, this run "
                    f"{key}); use another state_dir or delete it"
                )
        else:
            meta.write_text(json.dumps({"fingerprint": key}))

    def _path(self, index: int) -> Path:
        return self.dir / f"block_{index:03d}.safetensors"

    def load(self, index: int) -> tuple[dict[str, QuantizedWeight], dict, dict[str, dict]] | None:
        """A finished block's quantized weights, the statistics saved with them and its linears' trained
        parameters (empty for blocks saved before 2026-12-06; None: not finished)."""
        if self.dir is None or not self._path(index).is_file():
            return None
        from safetensors.torch import load_file

        tensors = load_file(self._path(index))
        meta = json.loads((self.dir / f"block_{index:03d}.json").read_text())
        if "weights" in meta:  # {"weights": {name: spec}, "stats": ...}
            specs, stats = meta["weights"], meta.get("stats", {})
        else:  # saved before 2026-12-05 (seventh session): the same stats copied into every weight's spec
            specs, stats = meta, next(iter(meta.values()), {}).get("stats", {})
        out, learned = {}, {}
        for name, s in specs.items():
            spec = QuantSpec(s["bits"], s["symmetric"], s["group_size"])
            out[name] = QuantizedWeight(tensors[f"{name}.qweight"], tensors[f"{name}.scale"],
                                        tensors.get(f"{name}.zero"), spec)
            prefix = f"{name}.learned."
            params = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if params:
                learned[name] = params
        return out, stats, learned

    def save(self, index: int, weights: dict[str, QuantizedWeight], stats: dict,
             learned: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
        if self.dir is None:
            return
        from safetensors.torch import save_file

        from qcompile.fsutil import atomic_write_text

        tensors, spec_meta = {}, {}
        for name, qw in weights.items():
            tensors[f"{name}.qweight"] = qw.qweight.contiguous()
            tensors[f"{name}.scale"] = qw.scale.contiguous()
            if qw.zero is not None:
                tensors[f"{name}.zero"] = qw.zero.contiguous()
            spec_meta[name] = {"bits": qw.spec.bits, "symmetric": qw.spec.symmetric,
                               "group_size": qw.spec.group_size}
            for k, v in (learned or {}).get(name, {}).items():
                tensors[f"{name}.learned.{k}"] = v.contiguous()
        tmp = self._path(index).with_suffix(".tmp")
        save_file(tensors, str(tmp))
        atomic_write_text(self.dir / f"block_{index:03d}.json", json.dumps({"weights": spec_meta, "stats": stats}))
        tmp.replace(self._path(index))  # the block counts as done only once its weights are complete


# -- the engine --------------------------------------------------------------------------------------------
class _FloatOriginals:
    """The float weights of linears an earlier pass already quantized, per decoder layer, to swap in while a float
    run (the target stream, the CLL look-ahead) goes through that layer."""

    def __init__(self, handle: ModelHandle, layers: list[nn.Module]):
        names = {id(m): n for n, m in handle.model.named_modules()}
        self.per_layer = {
            id(layer): [(m, handle.float_weights[names[id(m)]]) for m in layer.modules()
                        if isinstance(m, nn.Linear) and names.get(id(m)) in handle.float_weights]
            for layer in layers
        }

    @contextmanager
    def active(self, layers: list[nn.Module]):
        saved = []
        with torch.no_grad():
            for layer in layers:
                for m, w in self.per_layer.get(id(layer), ()):
                    saved.append((m, m.weight.detach().clone()))
                    m.weight.copy_(w.to(m.weight.device, m.weight.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for m, w in saved:
                    m.weight.copy_(w)


def _forward(layer: nn.Module, hidden: torch.Tensor, batch) -> torch.Tensor:
    return _layer_output(layer(hidden, *batch.args, **batch.kwargs))


@torch.no_grad()
def _advance(layers: list[nn.Module], hiddens: list[torch.Tensor], runner: LayerwiseRunner, float_mode: bool,
             originals: _FloatOriginals | None = None):
    """The streams after running ``layers`` in order (float mode: run-time quantizers off, float weights)."""
    out = []
    with originals.active(layers) if float_mode and originals is not None else nullcontext():
        for h, b in zip(hiddens, runner.batches):
            x = h.to(runner.device)
            for layer in layers:
                if float_mode:
                    with runtime_quant_disabled():
                        x = _forward(layer, x, b)
                else:
                    x = _forward(layer, x, b)
            out.append(x.to(runner.cache_device))
    return out


def train_blocks(handle: ModelHandle, config: BlockwiseConfig, make_param: MakeParam, method: str,
                 keep_learned: bool = False) -> dict:
    """Train, block by block, the parametrizations ``make_param`` gives each target linear; freeze them into
    quantized weights on ``handle``; with ``keep_learned``, keep each linear's trained parameters in
    ``handle.learned_params``. Returns statistics for the report."""
    config.validate(handle)
    if config.act_clip and not handle.act_quant:
        raise RecipeError(f"{method}: act_clip learns the activation quantizers' clip ratios, but no activation is "
                          "quantized; put an act_quant step before it in the recipe")
    todo = targets(handle, config)
    if not todo:
        return {"quantized_linears": 0}
    t0 = time.perf_counter()
    ad, model = handle.adapter, handle.model
    wanted = {id(m): (name, role, spec) for name, role, m, spec in todo}
    ids = config.load(handle.tokenizer)
    device = resolve_device(config.device, model)
    # without act_clip its fields change nothing, so states saved before they existed stay valid
    unused = () if config.act_clip else ("act_clip", "lr_act_clip")
    state = BlockState(str(Path(config.state_dir) / method) if config.state_dir else None,
                       fingerprint(handle, config, method, ignore=unused))
    layers = ad.layers(model)
    for name, _, _, _ in todo:  # trained parameters of an earlier learned pass no longer describe these weights
        handle.learned_params.pop(name, None)
    per_block, trained_params, resumed = [], 0, []
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = config.tf32
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with on_device(model, device):
            runner = LayerwiseRunner(handle, ids, batch_size=config.batch_size,
                                     cache_device="cpu" if config.offload_activations else None)
            x_quant = [b.hidden.clone() for b in runner.batches]
            originals = _FloatOriginals(handle, layers)
            # float outputs of blocks i, i+1, ..., i+k: block i's target and its CLL targets; each is computed
            # once (the later blocks are still float when it is), then shifts along as i advances
            float_chain = [_advance([layers[0]], [b.hidden for b in runner.batches], runner, float_mode=True,
                                    originals=originals)]
            bar = tqdm(range(len(layers)), desc=method, unit="block", leave=False)
            for i in bar:
                layer = layers[i]
                ahead = layers[i + 1 : i + 1 + config.cll_window]
                while len(float_chain) < 1 + len(ahead):
                    nxt = layers[i + len(float_chain)]
                    float_chain.append(_advance([nxt], float_chain[-1], runner, float_mode=True, originals=originals))
                targets_float, lookahead = float_chain[0], float_chain[1:]
                mods = [(wanted[id(m)][0], m, wanted[id(m)][2]) for m in _block_linears(ad, layer)
                        if id(m) in wanted]
                saved = state.load(i)
                if saved is not None:
                    weights, saved_stats, learned = saved
                    for name, qw in weights.items():
                        handle.set_quantized(name, qw)
                    if keep_learned:
                        handle.learned_params.update(learned)
                    set_clip_ratios(handle, saved_stats.get("act_clip", []))  # learned with these weights
                    resumed.append(i)
                    stats = {"resumed": True, **({"act_clip": saved_stats["act_clip"]} if "act_clip" in saved_stats
                                                 else {})}
                else:
                    with originals.active(ahead):  # the look-ahead blocks compute as the float model
                        stats, n, learned = _train_block(handle, runner, layer, ahead, mods, x_quant,
                                                         targets_float, lookahead, config, make_param,
                                                         torch.Generator().manual_seed(config.seed * 100003 + i))
                    trained_params += n
                    if keep_learned:
                        handle.learned_params.update(learned)
                    state.save(i, {name: handle.quant_state[name] for name, _, _ in mods}, stats, learned)
                per_block.append(stats)
                if "loss_after" in stats:
                    bar.set_postfix(loss=f"{stats['loss_after']:.4g}")
                x_quant = _advance([layer], x_quant, runner, float_mode=False)
                float_chain.pop(0)
                if not float_chain and i + 1 < len(layers):  # no CLL window: the next block's target
                    float_chain.append(_advance([layers[i + 1]], targets_float, runner, float_mode=True,
                                                originals=originals))
                del targets_float, lookahead
            head = ad.lm_head(model)
            if id(head) in wanted:
                name, _, spec = wanted[id(head)]
                w = head.weight.detach()
                handle.set_quantized(name, QuantizedWeight.from_float(
                    w, spec, search_clip(w, spec, name=name) if config.mse_clip else 1.0, name))
            samples, tokens = runner.num_samples, runner.num_tokens
            del runner, x_quant, float_chain
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    quantized_params = sum(m.weight.numel() for _, _, m, _ in todo)
    done = [s for s in per_block if "loss_after" in s]
    sites = [site for s in per_block for site in s.get("act_clip", [])]
    return {
        "method": method,
        "quantized_linears": len(todo),
        "samples": samples,
        "tokens": tokens,
        "epochs": config.epochs,
        "cll_window": config.cll_window,
        "trainable_params": trained_params,
        "trainable_share": trained_params / quantized_params if quantized_params else 0.0,
        "mean_loss_before": sum(s["loss_before"] for s in done) / len(done) if done else None,
        "mean_loss_after": sum(s["loss_after"] for s in done) / len(done) if done else None,
        "blocks": per_block,
        "resumed_blocks": resumed,
        **({"act_clip_ratios": clip_summary(sites)} if sites else {}),
        "device": str(device),
        "peak_gpu_memory_gb": (torch.cuda.max_memory_allocated(device) / 2**30) if device.type == "cuda" else None,
        "wall_seconds": time.perf_counter() - t0,
    }


def _block_linears(adapter, layer: nn.Module) -> list[nn.Linear]:
    from qcompile.models.adapters import LINEAR_ROLES

    return [adapter.linear(layer, r) for r in LINEAR_ROLES]


def _train_block(handle, runner, layer, ahead, mods, x_quant, targets_float, lookahead, config, make_param, gen):
    """Train one block; returns (stats, number of trained parameters, each linear's trained parameters). Leaves
    the block's linears quantized."""
    params: dict[str, LearnedWeight] = {}
    clips = ActivationClipping(handle, config.lr_act_clip, layers=[layer]) if config.act_clip else None
    try:
        for name, m, spec in mods:
            params[name] = make_param(name, m, spec).to(runner.device)
            parametrize.register_parametrization(m, "weight", params[name])
        groups: dict[str, list] = {}
        for p in params.values():
            for kind, ps in p.param_groups().items():
                groups.setdefault(kind, []).extend(ps)
        if clips is not None:
            clips.install(runner.device)
            groups.update(clips.param_groups())
        lrs = {**config.learning_rates(), **(clips.learning_rates() if clips is not None else {})}
        opt = torch.optim.AdamW([{"params": ps, "lr": lrs[k], **({"weight_decay": 0.0} if k == "act_clip" else {})}
                                 for k, ps in groups.items()], weight_decay=config.weight_decay)
        steps = config.epochs * len(runner.batches)
        sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps) if config.lr_schedule == "cosine"
                 else None)
        n_trained = sum(p.num_trainable() for p in params.values()) + len(clips.sites if clips else ())
        block_index = handle.adapter.layers(handle.model).index(layer)

        def loss_of(bi: int) -> tuple[torch.Tensor, torch.Tensor]:
            b = runner.batches[bi]
            out = _forward(layer, x_quant[bi].to(runner.device), b)
            rec = relative_mse(out, targets_float[bi].to(runner.device))
            loss = rec
            for nxt, tgt in zip(ahead, lookahead):
                with runtime_quant_disabled():
                    out = _forward(nxt, out, b)
                loss = loss + config.cll_weight * relative_mse(out, tgt[bi].to(runner.device))
            if config.penalty:
                loss = loss + config.penalty * sum(
                    p.penalty(m.parametrizations.weight.original) for (_, m, _), p in zip(mods, params.values()))
            return loss, rec

        @torch.no_grad()
        def evaluate() -> float:
            return sum(float(loss_of(bi)[1]) for bi in range(len(runner.batches))) / len(runner.batches)

        before = evaluate()
        # a block's steps can take minutes each on a CPU: this bar moves between the outer one's block updates
        with tqdm(total=steps, desc=f"block {block_index}", unit="step", leave=False, position=1) as steps_bar:
            for _ in range(config.epochs):
                for bi in torch.randperm(len(runner.batches), generator=gen).tolist():
                    loss, _ = loss_of(bi)
                    if not torch.isfinite(loss):
                        raise QCompileError(
                            f"{type(params[mods[0][0]]).__name__} training diverged in block {block_index} "
                            f"(loss {float(loss.detach())}); lower the learning rates"
                        )
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    if clips is not None:
                        clips.project()
                    if sched is not None:
                        sched.step()
                    steps_bar.update(1)
        after = evaluate()
        exported = {}
        with torch.no_grad():
            for name, m, _ in mods:
                exported[name] = params[name].export(m.parametrizations.weight.original.detach())
        learned = {name: p.trained_state() for name, p in params.items()}
        stats = {"loss_before": before, "loss_after": after}
        if clips is not None:
            # the learned ratios become the quantizers' clip_ratio; saved with the block's weights for a resume
            stats["act_clip"] = clips.learned()
            clips.finalize(handle)
    finally:
        if clips is not None:
            clips.uninstall()  # (a no-op after finalize)
        for name, m, _ in mods:
            if parametrize.is_parametrized(m, "weight"):
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
    for name, qw in exported.items():
        handle.set_quantized(name, qw)
    return stats, n_trained, learned
