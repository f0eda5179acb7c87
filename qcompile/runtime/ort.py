"""Run an exported folder on ONNX Runtime (CPU): sessions, logits, KV-cached generation, fused-op counts.

Reads only the folder (``model.onnx``, ``qcompile.json``); the layer count and cache shapes come from the
graph's ``past_key_values.*`` inputs, so any graph with Optimum's decoder-with-past interface runs here.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from qcompile.errors import QCompileError, first_line
from qcompile.fsutil import read_json

MODEL_FILE = "model.onnx"
META_FILE = "qcompile.json"
ACCURACY_KEY = "session.qdq_matmulnbits_accuracy_level"
_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)$")
_PAST_EXTRA = re.compile(r"past_key_values\.0\.(\w+)$")  # further per-layer cache streams, e.g. ``value_scale``
_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8,
             "tensor(uint8)": np.uint8}


def create_session(
    model_path: str | os.PathLike,
    *,
    accuracy_level: int | None = None,
    intra_op_threads: int | None = None,
    optimized_model_path: str | None = None,
    optimization_level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
) -> ort.InferenceSession:
    """A CPU session. ``accuracy_level`` is the compute type of the MatMulNBits nodes ORT fuses from
    DequantizeLinear -> MatMul (1: fp32, 4: int8 activations; ORT's default is 4); ``optimized_model_path`` saves
    the graph after ORT's optimizations (external initializers beside it). Threads default to the CPUs this process
    may run on."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = optimization_level
    if accuracy_level is not None:
        opts.add_session_config_entry(ACCURACY_KEY, str(int(accuracy_level)))
    if intra_op_threads is None and hasattr(os, "sched_getaffinity"):
        # ORT sizes its pool from the machine's cores, not the ones this process may use: under taskset or a
        # container's CPU set its spinning threads would outnumber the cores and crawl
        intra_op_threads = len(os.sched_getaffinity(0))
    if intra_op_threads is not None:
        opts.intra_op_num_threads = int(intra_op_threads)
    if optimized_model_path is not None:
        opts.optimized_model_filepath = str(optimized_model_path)
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                      Path(optimized_model_path).name + "_data")
        opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    try:
        return ort.InferenceSession(str(model_path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT's own errors (truncated graph, missing or short weights file) name no remedy
        first = first_line(e)
        raise QCompileError(f"ONNX Runtime cannot load {model_path} (damaged or incomplete export? re-export "
                            f"it): {first}") from None


def matmul_op_counts(model_path: str | os.PathLike, *, accuracy_level: int | None = None) -> dict[str, int]:
    """op_type -> node count of the graph after ORT's optimizations, e.g. how many MatMuls became ``MatMulNBits``.

    Uses the extended level: it holds every fusion that matters here (the DequantizeLinear -> MatMul fusion
    included) and, unlike ORT_ENABLE_ALL, saves no hardware-specific layout ops.
    """
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        create_session(model_path, accuracy_level=accuracy_level, optimized_model_path=str(optimized),
                       optimization_level=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
        graph = onnx.load(str(optimized), load_external_data=False).graph
        return dict(Counter(node.op_type for node in graph.node))


def _default_position_ids(attention_mask: np.ndarray, seq: int) -> np.ndarray:
    """As transformers' generate does: cumulative count of real tokens minus one (pads get 1), last ``seq``."""
    pos = np.cumsum(attention_mask, axis=-1) - 1
    pos[attention_mask == 0] = 1
    return pos[:, -seq:].astype(np.int64)


class OrtCausalLM:
    """A causal LM on ONNX Runtime with the decoder-with-past interface. Past/present are lists of
    ``(key, value)`` arrays per layer, [batch, kv_heads, length, head_dim], followed by any further cache streams
    the graph declares as ``past_key_values.N.<name>`` / ``present.N.<name>`` (``extra_streams``)."""

    def __init__(self, session: ort.InferenceSession, accuracy_level: int | None = None):
        self.session = session
        self.accuracy_level = accuracy_level
        self.input_names = {i.name for i in session.get_inputs()}
        self.num_layers = sum(1 for name in self.input_names if _PAST.match(name) and name.endswith(".key"))
        if not self.num_layers or "present.0.key" not in {o.name for o in session.get_outputs()}:
            raise ValueError("the graph has no past_key_values.*/present.* tensors: not a decoder-with-past model")
        # the present shape is static even where the past's head dim is left symbolic (see onnx_builder); other
        # tools' graphs may declare them on the past instead
        inputs = {i.name: i for i in session.get_inputs()}
        present = next(o for o in session.get_outputs() if o.name == "present.0.key")
        past_shape = inputs["past_key_values.0.key"].shape
        _, heads, _, dim = (p if isinstance(p, int) and p > 0 else q for p, q in zip(present.shape, past_shape))
        self.num_kv_heads, self.head_dim = heads, dim
        self.output_names = [o.name for o in session.get_outputs()]
        # cache streams beyond key/value (in a fixed order after them in each layer's past tuple): e.g. the
        # per-token scales onnxsim's int8 KV-cache pass keeps beside the codes; and the dtype of every stream
        self.extra_streams = sorted(m.group(1) for name in inputs if (m := _PAST_EXTRA.match(name))
                                    and m.group(1) not in ("key", "value"))
        self.stream_types = {name: _NP_TYPES.get(inputs[f"past_key_values.0.{name}"].type, np.float32)
                             for name in ("key", "value", *self.extra_streams)}
        self.stream_widths = {name: inputs[f"past_key_values.0.{name}"].shape[-1] for name in self.extra_streams}

    @classmethod
    def from_dir(cls, out_dir: str | os.PathLike, accuracy_level: int | None = None,
                 threads: int | None = None) -> OrtCausalLM:
        """Open an exported folder; ``accuracy_level`` defaults to the one recorded in its qcompile.json."""
        folder = Path(out_dir)
        if accuracy_level is None:
            meta = read_json(folder / META_FILE)
            level = meta.get("ort_session_options", {}).get(ACCURACY_KEY)
            accuracy_level = None if level is None else int(level)
        session = create_session(folder / MODEL_FILE, accuracy_level=accuracy_level, intra_op_threads=threads)
        return cls(session, accuracy_level)

    def empty_past(self, batch: int) -> list[tuple[np.ndarray, ...]]:
        """Per layer ``(key, value, *extra streams)``, zero positions long, in the graph's dtypes."""
        def empty(name):
            width = self.head_dim if name in ("key", "value") else self.stream_widths[name]
            width = width if isinstance(width, int) and width > 0 else 1
            return np.zeros((batch, self.num_kv_heads, 0, width), self.stream_types[name])

        return [tuple(empty(n) for n in ("key", "value", *self.extra_streams)) for _ in range(self.num_layers)]

    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray | None = None,
        position_ids: np.ndarray | None = None,
        past: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
    ) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
        """One step: logits [batch, seq, vocab] and the present cache. ``attention_mask`` covers past + seq
        (default all ones); ``position_ids`` default to the mask's running count, as in transformers."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        batch, seq = input_ids.shape
        past = self.empty_past(batch) if past is None else past
        total = past[0][0].shape[2] + seq
        if attention_mask is None:
            attention_mask = np.ones((batch, total), np.int64)
        attention_mask = np.asarray(attention_mask, dtype=np.int64)
        if position_ids is None:
            position_ids = _default_position_ids(attention_mask, seq)
        feed = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "position_ids" in self.input_names:
            feed["position_ids"] = np.asarray(position_ids, dtype=np.int64)
        streams = ("key", "value", *self.extra_streams)
        for i, layer in enumerate(past):
            for name, arr in zip(streams, layer):
                feed[f"past_key_values.{i}.{name}"] = arr
        outputs = dict(zip(self.output_names, self.session.run(None, feed)))
        present = [tuple(outputs[f"present.{i}.{name}"] for name in streams) for i in range(self.num_layers)]
        return outputs["logits"], present

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """Logits [batch, seq, vocab] of full, unpadded sequences (no cache)."""
        return self.forward(input_ids)[0]

    def generate(
        self,
        input_ids: Sequence[int] | np.ndarray,
        max_new_tokens: int,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        on_token: Callable[[int], None] | None = None,
    ) -> list[int]:
        """New tokens after the prompt (eos included when reached): one prefill, then one cached step per token."""
        ids = np.asarray(input_ids, dtype=np.int64).reshape(1, -1)
        eos = set() if eos_token_id is None else {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
        rng = np.random.default_rng(seed)
        out: list[int] = []
        past, step_ids, length = None, ids, ids.shape[1]
        for _ in range(max_new_tokens):
            positions = np.arange(length - step_ids.shape[1], length, dtype=np.int64)[None]
            logits, past = self.forward(step_ids, np.ones((1, length), np.int64), positions, past)
            token = _pick(logits[0, -1], do_sample, temperature, top_p, rng)
            out.append(token)
            if on_token is not None:
                on_token(token)
            if token in eos:
                break
            step_ids, length = np.array([[token]], np.int64), length + 1
        return out


def _pick(logits: np.ndarray, do_sample: bool, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    if not do_sample or temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if top_p < 1.0:  # smallest set of most likely tokens whose mass reaches top_p
        order = np.argsort(-probs)
        keep = order[: int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1]
        mask = np.zeros_like(probs)
        mask[keep] = probs[keep]
        probs = mask / mask.sum()
    return int(rng.choice(probs.size, p=probs))
