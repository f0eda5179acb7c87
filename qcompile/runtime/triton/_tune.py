"""Choosing a kernel configuration: timed once per shape key on the GPU, fixed under the interpreter.

A small tuner instead of ``triton.autotune``: the candidate list depends on the shape (e.g. the split-K factor is
derived from N, K and the SM count), a test can force any candidate, and a key seen for the first time while a CUDA
graph is being captured is an error naming the kernel (tuning must happen in the eager warm-up before capture).

Picks are kept on disk (``TuningCache``), so a later process on the same GPU model, with the same Triton, torch
and kernel sources, starts without tuning (tuning is part of a 1.2B model's 24-62 s setup on an H100; how much
was not measured apart).
``QCOMPILE_TUNE_CACHE=0`` turns the disk cache off.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from qcompile.fsutil import atomic_write_text, cache_root
from qcompile.runtime.triton._env import autotuning, interpreting


def num_sms(device) -> int:
    if interpreting() or torch.device(device).type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def supports_pdl(device) -> bool:
    """Programmatic dependent launch (a kernel launched while the one before drains, waiting in-kernel for its
    writes with ``gdc_wait``): compiled kernels on sm_90 and newer."""
    dev = torch.device(device)
    return not interpreting() and dev.type == "cuda" and torch.cuda.get_device_capability(dev)[0] >= 9


def pdl_flag(pdl: bool, device) -> tuple[bool, dict]:
    """Resolve a request for programmatic dependent launch: off under the interpreter (a plain launch there),
    refused below sm_90; returns the kernel's ``PDL`` flag and the launch option to pass with it."""
    on = bool(pdl) and not interpreting()
    if on and not supports_pdl(device):
        raise ValueError("PDL (programmatic dependent launch) needs an sm_90 or newer GPU")
    return on, ({"launch_pdl": True} if on else {})


def launch_opts(cfg: dict) -> tuple[dict, dict]:
    """Split a config into kernel meta-parameters and launch options (num_warps, num_stages, and ``maxnreg``, a
    per-thread register cap that lets more programs share a multiprocessor, where a config names one)."""
    meta = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages", "maxnreg")}
    if interpreting():
        return meta, {}
    opts = {"num_warps": cfg.get("num_warps", 4), "num_stages": cfg.get("num_stages", 2)}
    if cfg.get("maxnreg") is not None:
        opts["maxnreg"] = cfg["maxnreg"]
    return meta, opts


class TuningCache:
    """Tuner picks on disk, one JSON file per GPU model, Triton and torch version and hash of the kernels' sources
    (``$QCOMPILE_CACHE/triton-tuning/``): ``"<tuner>|<repr(key)>" -> config``. A pick is used only while it is
    still one of the key's candidates; a damaged or unwritable file costs a re-tune, never a failed run."""

    def __init__(self, root: Path | None = None):
        self.root = root
        self._entries: dict | None = None

    @staticmethod
    def enabled() -> bool:
        return os.environ.get("QCOMPILE_TUNE_CACHE", "1") != "0"

    def path(self) -> Path:
        import triton

        root = self.root if self.root is not None else cache_root() / "triton-tuning"
        tag = f"{_device_tag()}-triton{triton.__version__}-torch{torch.__version__}-{_sources_hash()}"
        return root / (re.sub(r"[^A-Za-z0-9.+_-]+", "-", tag) + ".json")

    def _load(self) -> dict:
        if self._entries is None:
            self._entries = {}
            try:
                path = self.path()
                data = json.loads(path.read_text())
                if isinstance(data, dict):
                    self._entries = {k: v for k, v in data.items() if isinstance(v, dict)}
            except FileNotFoundError:
                pass
            except Exception as e:  # noqa: BLE001 (damaged, unreadable, no device: tune afresh, never fail the run)
                warnings.warn(f"ignoring the kernel tuning cache: {e}", stacklevel=3)
        return self._entries

    def get(self, tuner: str, key, candidates: list[dict]) -> dict | None:
        cfg = self._load().get(f"{tuner}|{key!r}")
        return next((c for c in candidates if c == cfg), None)

    def put(self, tuner: str, key, cfg: dict) -> None:
        entries = self._load()
        entries[f"{tuner}|{key!r}"] = cfg
        try:
            path = self.path()
            path.parent.mkdir(parents=True, exist_ok=True)
            try:  # merged with what another process may have written meanwhile
                on_disk = json.loads(path.read_text())
                if isinstance(on_disk, dict):
                    entries = {**on_disk, **entries}
            except (OSError, ValueError):
                pass
            atomic_write_text(path, json.dumps(entries, indent=1, sort_keys=True))
            self._entries = entries
        except Exception as e:  # noqa: BLE001 (the pick still holds in memory for this process)
            warnings.warn(f"could not write the kernel tuning cache: {e}", stacklevel=3)


@functools.cache
def _sources_hash() -> str:
    """The kernels' source files (this folder): a changed kernel may change which configuration is best."""
    h = hashlib.sha256()
    for p in sorted(Path(__file__).parent.glob("*.py")):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def _device_tag() -> str:
    """The current GPU's model, compute capability and multiprocessor count (what the picks depend on)."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return f"{props.name}-sm{props.major}{props.minor}-{props.multi_processor_count}sms"


DISK = TuningCache()


class Tuner:
    """Per-kernel cache ``key -> best config`` (in memory, and through ``DISK`` between processes); ``best`` is
    read by the benchmarks to report what was chosen."""

    def __init__(self, name: str):
        self.name = name
        self.best: dict = {}

    def run(self, key, candidates: list[dict], launch: Callable[[dict], None], config: dict | None = None,
            timing: Callable[[], Callable[[dict], None]] | None = None) -> dict:
        """Launch the best candidate for ``key`` (tuning it first if new). ``timing``, if given, is called once per
        tuning and returns the launcher that the candidates are timed with instead of ``launch`` (e.g. a chain of
        launches over copies of the operands, where one launch alone would not show what differs)."""
        if config is not None:
            launch(config)
            return config
        if not candidates:
            raise ValueError(f"{self.name}: no kernel configuration fits key {key}")
        if not autotuning() or len(candidates) == 1:
            launch(candidates[0])
            return candidates[0]
        cfg = self.best.get(key)
        if cfg is None and TuningCache.enabled():
            cfg = DISK.get(self.name, key, candidates)
            if cfg is not None:
                self.best[key] = cfg
        if cfg is None:
            if torch.cuda.is_current_stream_capturing():
                raise RuntimeError(f"{self.name}: shape {key} was not tuned before CUDA-graph capture; run the same "
                                   "call once eagerly first")
            cfg = self._tune(key, candidates, timing() if timing is not None else launch)
            if TuningCache.enabled():
                DISK.put(self.name, key, cfg)
        launch(cfg)
        return cfg

    def _tune(self, key, candidates: list[dict], launch: Callable[[dict], None]) -> dict:
        from tqdm.auto import tqdm

        best, best_ms, last_err = None, float("inf"), None
        # a model's first run on a GPU tunes a few dozen keys (tens of seconds, silent otherwise); later runs read
        # the picks from DISK and show nothing
        for cfg in tqdm(candidates, desc=f"tuning {self.name}", unit="config", leave=False):
            try:
                ms = _time_config(launch, cfg)
            except Exception as e:  # a config the compiler or the device rejects (e.g. shared memory)
                last_err = e
                continue
            if ms < best_ms:
                best, best_ms = cfg, ms
        if best is None:
            raise RuntimeError(f"{self.name}: every configuration failed for {key}") from last_err
        self.best[key] = best
        return best


def _time_config(launch: Callable[[dict], None], cfg: dict) -> float:
    """Milliseconds of one ``launch(cfg)`` as the runner runs it: replayed from a CUDA graph, so the CPU's launch
    time between the kernels of one call (e.g. split-K attention and its combine) is not counted, with the L2 cache
    flushed before every replay (``do_bench``). Eager timing counts that gap too, which for calls of 15-30 us can
    swamp the differences between candidates: on an H200 the eager picks for decode attention came out at
    0.61-0.81x the speed of the best candidate in three of four cases (bench/triton_attn_variants.py). A launch
    that cannot be captured is timed eagerly."""
    from triton.testing import do_bench

    launch(cfg)  # compiles, and tunes any kernel the launch calls, before the capture
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            launch(cfg)
    except RuntimeError:
        torch.cuda.synchronize()
        return do_bench(lambda: launch(cfg), warmup=5, rep=25)
    return do_bench(graph.replay, warmup=5, rep=25)
