"""One ONNX Runtime session: token sequences in, the model's sentence vectors out.

The vectors are what sentence-transformers returns for the model: L2-normalised when the
model has a Normalize module, as computed otherwise. A graph embedpool builds ends in the
model's whole head (``graph.head``); a shipped ``onnx/model.onnx`` that outputs token states
gets the same head in numpy (``graph.head.head_numpy``).

The engine knows nothing of pools, files or jobs. A picklable ``EngineSpec`` is the recipe
a worker process uses to build its own engine (``spec.build()``), so the same engine runs
in-process, in pool workers and in Ray actors. ``EngineSpec.runtime`` picks the inference
runtime behind the same contract: ONNX Runtime (``Engine``, here) or OpenVINO
(``engine_openvino.OpenVinoEngine``, the only module that imports openvino); which one runs
where is ``runtimes.choose``'s decision.

Memory. A worker's RSS is the loaded weights plus the activations of the batch in flight.
What glibc keeps after freeing is returned by the worker (``pool.worker.release_memory``,
after loading and after each batch), and a worker imports nothing it does not run (no
``onnx`` once the graph is cached). Above the weights, ONNX Runtime's arena holds the
largest batch's activations (attention holds batch x heads x seq^2 fp32 scores at once), so
the token budget bounds it; numbers per setting: benchmarks/worker_rss.py.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from embedpool.errors import ConfigError, InputError, ModelError
from embedpool.graph.external import has_external_data
from embedpool.graph.head import PROMPT_LENGTH, head_numpy, load_dense
from embedpool.models import ResolvedModel
from embedpool.models.shipped_onnx import Tensor, choose_output
from embedpool.modelspec import HeadSpec
from embedpool.types import Precision, Runtime, TokenIds, Vectors
from embedpool.vectors import l2_normalize

if TYPE_CHECKING:
    import onnxruntime as ort

# onnxruntime is imported where a session is made: the parent of a pool builds recipes
# (EngineSpec) and spawns workers without it (~0.2 s of its start and ~25 MB of its RSS).


def usable_cores() -> int:
    """Cores this process may run on (affinity-aware; cgroup quotas live in pool.resources)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class EngineSpec:
    """Everything a process needs to build an engine; cheap to pickle."""

    model: ResolvedModel
    precision: Precision = "int8"
    threads: int = 1
    #: "cpu" or "cuda:N" (embedpool.cuda_ep); on a GPU, ORT's arena cap in bytes (None: none).
    device: str = "cpu"
    gpu_mem_limit: int | None = None
    #: "onnxruntime" (every precision and device) or "openvino" (the CPU: fp32, int8, bf16).
    runtime: Runtime = "onnxruntime"

    def __post_init__(self) -> None:
        if self.runtime == "openvino":
            if self.device != "cpu" or self.precision not in ("fp32", "int8", "bf16"):
                raise ConfigError(
                    f"the openvino engine runs fp32, int8 or bf16 on the CPU, not "
                    f"{self.precision} on {self.device}"
                )
        elif self.runtime != "onnxruntime":
            raise ConfigError(f"runtime must be onnxruntime or openvino, got {self.runtime!r}")
        elif self.precision not in ("fp32", "int8", "fp16"):
            raise ConfigError(f"precision must be fp32, int8 or fp16, got {self.precision!r}")
        if self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        on_gpu = self.device != "cpu"
        if (self.precision == "fp16" and not on_gpu) or (self.precision == "int8" and on_gpu):
            raise ConfigError(
                f"precision {self.precision} does not run on {self.device}: int8 "
                "is the CPU's, fp16 the GPU's (fp32 runs on both)"
            )

    def on_cpu(self, precision: Precision = "fp32") -> EngineSpec:
        """This engine on the CPU, for a pool whose GPU was lost (fp16 becomes fp32: the
        precision fp16 is checked against, so the vectors stay within its tolerance)."""
        cpu: Precision = self.precision if self.precision != "fp16" else precision
        return dataclasses.replace(self, device="cpu", gpu_mem_limit=None, precision=cpu)

    def build(self) -> Engine:
        """The engine, its graph built first if need be."""
        return self.load(self.graph())

    def graph(self) -> Path:
        """The ONNX file this spec's engine reads (``graph.prepare_onnx``; OpenVINO's:
        ``engine_openvino.graph_for``), built if need be."""
        if self.runtime == "openvino":
            from embedpool.engine_openvino import graph_for

            return graph_for(self.model, precision=self.precision)
        from embedpool.graph import prepare_onnx

        precision = self.precision
        if precision == "bf16":  # refused in __post_init__; narrows the type
            raise ConfigError("precision bf16 runs on the openvino engine only")
        return prepare_onnx(self.model, precision)

    def load(self, path: Path) -> Engine:
        """This spec's engine on the graph at ``path`` (``graph()``'s file, maybe shipped
        elsewhere: the Ray actors)."""
        if self.runtime == "openvino":
            from embedpool.engine_openvino import OpenVinoEngine

            return OpenVinoEngine.for_spec(self, path)
        return Engine.for_model(
            path,
            self.model,
            threads=self.threads,
            device=self.device,
            gpu_mem_limit=self.gpu_mem_limit,
            precision=self.precision,
        )


def session_options(threads: int) -> ort.SessionOptions:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = min(threads, usable_cores())
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Threads spin-wait by default, burning a core between batches and starving sibling
    # workers; a pool of single-threaded workers gains nothing from spinning.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0" if threads == 1 else "1")
    if threads > 1:
        # Hand out each op's work in shrinking blocks rather than one fixed share per thread,
        # so a thread slowed by another process (the parent tokenising) does not hold up the
        # op. Best of 3 rounds, 200 stdlib chunks, 3 x 256-token batches, 2 threads: fp32 19.7
        # -> 20.3 chunks/s, int8 21.9 -> 23.3 (base 2 and 8 also beat the default).
        opts.add_session_config_entry("session.dynamic_block_base", "4")
    # The arena keeps its high-water mark (the 863 MB peak of bare ORT at batch 32 x 256), so
    # the batch token budget, not the arena, bounds memory: a worker's RSS is its load plus
    # one budget-sized batch. Within that it is faster and lighter than allocating tensor by
    # tensor from glibc, which refaults zeroed pages for every batch (benchmarks/
    # worker_rss.py, 1 thread, 4 x 256 tokens: int8 12.5 vs 10.1 chunks/s and peak 145 vs
    # 160 MiB; fp32 10.5 vs 9.2 chunks/s, peak 192 vs 190 MiB).
    opts.enable_cpu_mem_arena = True
    # The memory pattern pre-allocates, from the first run of each shape, one block holding
    # every planned activation: every batch has a new shape here, and it measured slower and
    # no lighter (benchmarks/worker_rss.py, variant mem-pattern).
    # Also measured, no effect on RSS or speed: session.disable_prepacking and
    # session.use_device_allocator_for_initializers.
    opts.enable_mem_pattern = False
    return opts


class Engine:
    """A loaded ONNX session plus, for shipped graphs, the model's head; always fully built."""

    @staticmethod
    def _options(onnx_path: Path, threads: int) -> ort.SessionOptions:
        """``session_options``; for a graph whose weights are a memory-mapped side file that
        every worker shares (graph/external.py), without pre-packing, which would copy them
        into each worker's private memory."""
        opts = session_options(threads)
        if has_external_data(onnx_path):
            opts.add_session_config_entry("session.disable_prepacking", "1")
        return opts

    def __init__(
        self,
        onnx_path: Path,
        *,
        head: HeadSpec,
        dim: int,
        threads: int = 1,
        head_in_graph: bool = True,
        device: str = "cpu",
        gpu_mem_limit: int | None = None,
        precision: str = "int8",
        segments: bool = False,
        vocab_rows: int | None = None,
    ) -> None:
        """``head_in_graph``: a [batch, dim] output already went through ``head`` (embedpool
        built the graph); otherwise (a shipped graph that pools by itself) Normalize and
        truncate_dim are applied here. Token-state outputs always get the whole head here.
        ``device`` "cuda:N" runs the session on that GPU (``cuda_ep``), with ORT's arena
        capped at ``gpu_mem_limit`` bytes. ``segments`` (a cross-encoder whose tokenizer
        hands the model token types): ``embed``'s ``prompt_lengths`` are each pair's first
        segment (``[CLS] query [SEP]``), and the tokens after it get token type 1.
        ``vocab_rows``: the model's token-embedding rows (``ResolvedModel.vocab_rows``); a
        token id past them is refused by ``embed``."""
        import onnxruntime as ort

        from embedpool import cuda_ep

        self.device = device
        if device != "cpu":
            threads = 1  # the CPU side only feeds the GPU (a few shape ops run there)
            cuda_ep.prepare(device)
        try:
            self.session = ort.InferenceSession(
                str(onnx_path),
                sess_options=self._options(Path(onnx_path), threads),
                providers=cuda_ep.providers_for(device, gpu_mem_limit, precision),
            )
        except Exception as exc:
            if device != "cpu":
                raise cuda_ep.unavailable(device, exc) from exc
            raise ModelError(f"ONNX Runtime cannot load {onnx_path}: {exc}") from exc
        cuda_ep.check_session(self.session.get_providers(), device)
        self.threads = threads
        # a shipped graph's token states (models.shipped_onnx: resolve refused or set aside
        # one without them); int32 ids where it declares them (a legal export)
        declared = [Tensor(o.name, 0, len(o.shape or ())) for o in self.session.get_outputs()]
        chosen = None if head_in_graph else choose_output(declared)
        out = (
            self.session.get_outputs()[[d.name for d in declared].index(chosen.name)]
            if chosen is not None
            else self.session.get_outputs()[0]
        )
        self._int32_inputs = {
            i.name for i in self.session.get_inputs() if i.type == "tensor(int32)"
        }
        self._bind(
            onnx_path,
            head=head,
            dim=dim,
            head_in_graph=head_in_graph,
            segments=segments,
            vocab_rows=vocab_rows,
            inputs={i.name for i in self.session.get_inputs()},
            output=out.name,
            output_shape=list(out.shape),
        )

    def _bind(
        self,
        onnx_path: Path,
        *,
        head: HeadSpec,
        dim: int,
        head_in_graph: bool,
        inputs: set[str],
        output: str,
        output_shape: Sequence[object],
        segments: bool = False,
        vocab_rows: int | None = None,
    ) -> None:
        """What ``embed`` needs of the loaded graph, whichever runtime loaded it: its inputs,
        the output it reads (``output_shape``: rank and, where static, width)."""
        self.onnx_path = onnx_path
        self.head = head
        self._head_in_graph = head_in_graph
        self._needs_type_ids = "token_type_ids" in inputs
        self._needs_prompt_length = PROMPT_LENGTH in inputs
        self._segments = segments
        self._vocab_rows = vocab_rows
        self._output = output
        # token states (a shipped encoder, or a graph built without its head) get the head
        # here; a [batch, dim] output is final when embedpool built it (head_in_graph)
        self._token_states = len(output_shape) == 3
        self._dense = [load_dense(d) for d in head.dense] if self._token_states else []
        if not head_in_graph and not self._token_states and head.dense:
            raise ModelError(
                f"{onnx_path} outputs pooled vectors ({output}), so embedpool cannot add the "
                f"model's Dense layers after them; ship a graph that outputs last_hidden_state"
            )
        width = output_shape[-1]
        self.dim = dim or (width if isinstance(width, int) else 0)

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The graph's output for one batch's inputs (the runtime's one call)."""
        if self._int32_inputs:
            feeds = {
                k: v.astype(np.int32) if k in self._int32_inputs else v for k, v in feeds.items()
            }
        out: np.ndarray = self.session.run([self._output], feeds)[0]
        return out

    @classmethod
    def for_model(
        cls,
        onnx_path: Path,
        model: ResolvedModel,
        *,
        threads: int = 1,
        device: str = "cpu",
        gpu_mem_limit: int | None = None,
        precision: str = "int8",
    ) -> Engine:
        """The engine for ``model``'s graph at ``onnx_path`` (from ``graph.prepare_onnx``).
        An error in a graph embedpool built from a shipped ``onnx/model.onnx`` (its int8
        graph, in the graph cache) names the user's file first."""
        try:
            return cls(
                onnx_path,
                head=model.head,
                dim=model.dim,
                threads=threads,
                head_in_graph=model.onnx_path is None,
                device=device,
                gpu_mem_limit=gpu_mem_limit,
                precision=precision,
                segments=model.classifier is not None and model.classifier.token_types,
                vocab_rows=model.vocab_rows,
            )
        except ModelError as exc:
            shipped = model.onnx_path
            if shipped is None or onnx_path == shipped:
                raise
            raise ModelError(
                f"{shipped}: the {precision} graph embedpool built from it "
                f"({onnx_path}) cannot be used: {exc}"
            ) from exc

    def embed(
        self, sequences: Sequence[TokenIds], prompt_lengths: Sequence[int] | None = None
    ) -> Vectors:
        """Vectors for already-tokenised sequences, in the given order. ``prompt_lengths``:
        per sequence, its prompt's length in tokens (``tokenization.Encoded.prompt_length``);
        only models whose Pooling leaves the prompt out read it (None: no prompts)."""
        n = len(sequences)
        if n == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        longest = max(len(s) for s in sequences)
        ids = np.zeros((n, longest), dtype=np.int64)
        mask = np.zeros((n, longest), dtype=np.int64)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        self._check_ids(ids)
        plen = (
            np.zeros(n, dtype=np.int64)
            if prompt_lengths is None
            else np.asarray(prompt_lengths, dtype=np.int64)
        )
        feeds = {"input_ids": ids, "attention_mask": mask}
        if self._needs_type_ids:
            feeds["token_type_ids"] = np.zeros_like(ids)
            if self._segments:  # a pair: type 1 from the document's first token on
                feeds["token_type_ids"] = (
                    (np.arange(longest)[None, :] >= plen[:, None]) & (mask == 1)
                ).astype(np.int64)
        if self._needs_prompt_length:
            feeds[PROMPT_LENGTH] = plen
        out = self._run(feeds)
        if self._token_states:
            return _finite(head_numpy(out, mask, self.head, self._dense, plen))
        vectors: Vectors = out.astype(np.float32, copy=False)
        if not self._head_in_graph:  # a shipped graph that pools by itself (no Dense)
            if self.head.normalize:
                vectors = l2_normalize(vectors)
            if self.head.truncate_dim is not None:
                vectors = np.ascontiguousarray(vectors[:, : self.head.truncate_dim])
        return _finite(vectors)

    def _check_ids(self, ids: np.ndarray) -> None:
        """Refuses a token id past the model's embedding table, the same way on every
        runtime (OpenVINO would read past the table and return a wrong vector)."""
        rows = self._vocab_rows
        if rows is None or ids.size == 0 or int(ids.max()) < rows:
            return
        seq, pos = (int(i) for i in np.argwhere(ids >= rows)[0])
        raise InputError(
            f"token id {int(ids[seq, pos])} (sequence {seq} of the batch, token {pos}) is "
            f"outside the model's embedding table of {rows} rows: its tokenizer makes ids "
            "the model has no vector for (tokens added without resizing the embeddings)"
        )


def _finite(vectors: Vectors) -> Vectors:
    """The batch's vectors, or an error naming the first row that holds NaN or inf (fp16
    overflow, a broken graph): never a silently wrong vector. The job splits the batch, so
    the error ends up on that item alone."""
    ok = np.isfinite(vectors).all(axis=-1)
    if not ok.all():
        row = int(np.argmin(ok))
        raise ModelError(
            f"the model's output for sequence {row} of the batch is not finite (NaN or inf); "
            "with --precision fp16 or bf16, fp32 may avoid the overflow"
        )
    return vectors
