"""The embedding job: texts in, vectors out in input order, through any executor.

    any iterable ──window (16, 32, ... WINDOW_ITEMS items)───▶ prepare.prepare: dedupe,
    (read lazily; the next window is read and prepared     cache lookup, tokenise the misses
     in a background thread while this one runs)                      │
                                                            plan_batches (token budget)
                                                                      ▼
    caller ◀── window vectors in ◀── prepare.Assembly ◀── BatchResults ◀── executor.run
               input order, with     (windows averaged,                   (placement.
               their ids             cache written per batch)             start_executor)

A call's prompt (explicit, named, or the model's default) is resolved once (``options``): it is
tokenised with every text and keys the cache with it; ``dimensions`` cut the finished vectors
(the cache keeps them whole).

Windows bound memory whatever the input's size: the job holds the window it runs, the next
one it prepares and the one the caller writes (texts, tokens, vectors), never the input. The
first window is small so the first vectors are out in seconds; windows then double up to
WINDOW_ITEMS, where length sorting wastes little padding. Every finished batch is written to
the cache at once, so an interrupted job loses only its in-flight batches and a rerun resumes.
The steps either side of the executor are ``prepare.py``'s, which the server shares.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedpool import events
from embedpool.batching import plan_batches
from embedpool.errors import ConfigError, InputError
from embedpool.executor import Executor, WorkBatch, run
from embedpool.graph import graph_id
from embedpool.models import DEFAULT_MODEL, ResolvedModel, resolve_model
from embedpool.models.crossencoder import refuse_cross_encoder
from embedpool.options import CallOptions, resolve_options
from embedpool.placement import place, prepare_graphs, start_executor
from embedpool.prepare import Assembly, Prepared, prepare
from embedpool.tokenization import TextTokenizer
from embedpool.types import EventCallback, LongTextMode, Precision, TokenIds, Vectors

if TYPE_CHECKING:
    from embedpool.cache import BoundCache, VectorCache

log = logging.getLogger(__name__)

#: Items prepared, batched and assembled together. Larger windows sort better (less padding)
#: but hold more texts, tokens and vectors: the job holds up to three windows, about 2-3 KB
#: per item beyond the vectors (4096 x 384 floats is 6 MB). 4,096 kept a 1M-chunk job's
#: parent within 1.3x of a 10k-chunk one's (benchmarks/streaming.py).
WINDOW_ITEMS = 4096
#: The first window's items; each next window doubles, up to WINDOW_ITEMS. A window's vectors
#: are written when it is whole, and while the pool starts one worker runs it alone: 16 chunks
#: of ~130 MiniLM tokens are two or three batches of the CPU's budget, so the first vectors
#: are out a few batches after the first worker is ready (64 took ~3 s more under load:
#: benchmarks/streaming.py). Reaching WINDOW_ITEMS takes two windows more than from 64.
FIRST_WINDOW_ITEMS = 16
#: Default precision: "auto" is int8 on the CPU, which meets the quality bar (README
#: "Precision") at about twice fp32's speed, and fp16 on a GPU (placement.precision_for).
DEFAULT_PRECISION = "auto"
#: Ids the report lists (truncated chunks): the counts are exact, the list stops here, so a
#: job of any size keeps a bounded report.
MAX_LISTED_IDS = 1000


@dataclass
class ItemError:
    index: int
    id: str
    message: str


@dataclass
class JobReport:
    """Counters of one job; the CLI prints it as the final summary."""

    chunks: int = 0
    embedded: int = 0
    truncated: int = 0
    truncated_ids: list[str] = field(default_factory=list)
    empty: int = 0
    tokens: int = 0
    cache_hits: int = 0
    inferred: int = 0
    #: The first input errors (the CLI keeps MAX_ERRORS_SHOWN) and how many there were.
    input_errors: list[InputError] = field(default_factory=list)
    input_error_count: int = 0
    item_errors: list[ItemError] = field(default_factory=list)
    seconds: float = 0.0
    interrupted: bool = False
    peak_rss: int = 0
    #: Where the model ran and in which precision, and any fallback (placement, devices).
    device: str = ""

    @property
    def chunks_per_s(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    @property
    def errors(self) -> int:
        return max(self.input_error_count, len(self.input_errors)) + len(self.item_errors)

    def as_dict(self) -> dict[str, Any]:
        return {
            "chunks": self.chunks,
            "embedded": self.embedded,
            "truncated": self.truncated,
            "empty": self.empty,
            "tokens": self.tokens,
            "cache_hits": self.cache_hits,
            "inferred": self.inferred,
            "errors": self.errors,
            "seconds": round(self.seconds, 3),
            "chunks_per_s": round(self.chunks_per_s, 2),
            "peak_rss_bytes": self.peak_rss,
            "interrupted": self.interrupted,
            "device": self.device,
        }


@dataclass(frozen=True)
class WindowResult:
    """A window's vectors in input order; ``ok[i]`` says whether row i is a real vector."""

    start: int
    ids: list[str]
    vectors: Vectors
    ok: np.ndarray


@dataclass
class _Window:
    """One prepared window (``prepare.Prepared``), its batches, and its assembly."""

    start: int
    ids: list[str]
    prep: Prepared
    batches: list[WorkBatch]
    positions: dict[int, tuple[int, ...]]  # batch id -> sequence indices
    assembly: Assembly  # over prep.missing: sequence vectors -> one vector per missing text


class Embedder:
    """Loads a model once and embeds any number of texts.

    ``workers=None`` runs the engine in this process (no subprocesses: safe in any script);
    ``workers="auto"`` or an int runs the adaptive worker pool; ``backend="ray"`` runs Ray actors.
    ``device`` is "auto" (a GPU when onnxruntime-gpu and one are present, else the CPU),
    "cpu" or "cuda[:N]"; ``precision`` "auto" is int8 on the CPU and fp16 on a GPU;
    ``cpu_workers`` adds CPU workers next to the GPUs (``placement``). ``batch_tokens`` and
    ``max_batch_items`` default to the device's (a GPU's batches are much bigger).
    ``lazy=True`` starts the executor only when a text misses the cache, so a re-run over an
    unchanged corpus starts no model at all. ``runtime`` (the CLI's ``--engine``) is the
    CPU's inference runtime: "auto" (per CPU, from measurements: ``runtimes``),
    "onnxruntime" or "openvino" (which also runs ``precision="bf16"``); None: the
    ``EMBEDPOOL_ENGINE`` environment variable, else "auto". ``engine`` is
    something else: a custom engine recipe (tests).
    """

    def __init__(
        self,
        model: str | Path | ResolvedModel = DEFAULT_MODEL,
        *,
        precision: str = DEFAULT_PRECISION,
        threads: int | None = None,
        workers: int | str | None = None,
        long_text: LongTextMode = "truncate",
        batch_tokens: int | None = None,
        max_batch_items: int | None = None,
        cache: VectorCache | None = None,
        backend: str = "local",
        ray_address: str | None = None,
        pool_options: dict[str, Any] | None = None,
        on_event: EventCallback | None = None,
        engine: Any = None,
        lazy: bool = False,
        device: str = "auto",
        cpu_workers: int | None = None,
        runtime: str | None = None,
    ) -> None:
        from embedpool.device_choice import DevicePlan

        if long_text not in ("truncate", "window"):
            raise ConfigError(f"long_text must be 'truncate' or 'window', got {long_text!r}")
        if backend not in ("local", "ray"):
            raise ConfigError(f"backend must be 'local' or 'ray', got {backend!r}")
        self.model = model if isinstance(model, ResolvedModel) else resolve_model(model)
        refuse_cross_encoder(self.model)
        custom = DevicePlan.for_recipe(engine, device)
        self.placement = place(
            self.model,
            device=device,
            precision=precision,
            cpu_workers=cpu_workers,
            batch_tokens=batch_tokens,
            max_batch_items=max_batch_items,
            backend=backend,
            plan=custom,
            profile=(pool_options or {}).get("profile"),
            engine=runtime,
        )
        self.precision: Precision = self.placement.precision
        self.long_text: LongTextMode = long_text
        self.batch_tokens = self.placement.batch_tokens
        self.max_batch_items = self.placement.max_batch_items
        self.cache = cache
        self.on_event = on_event
        self._emit = events.Emitter(on_event, log)  # a raising callback never aborts a job
        self.tokenizer = TextTokenizer.for_model(self.model)
        if engine is None:  # built here, before any worker starts; int8 may fall back to fp32
            self.placement = prepare_graphs(
                self.model,
                self.placement,
                self._emit,
                max_memory=(pool_options or {}).get("max_memory_bytes"),
            )
            self.precision = self.placement.precision
        self.fingerprint = self.model.fingerprint(
            self.precision,
            long_text,
            graph=graph_id(self.model, self.precision, self.placement.runtime),
        )
        self.last_report = JobReport()
        self._engine = engine  # any recipe with .build() (a custom engine, embedpool.testing)
        self._executor_args: dict[str, Any] = {
            "workers": workers,
            "threads": threads,
            "backend": backend,
            "ray_address": ray_address,
            "pool_options": pool_options or {},
        }
        self._executor: Executor | None = None
        self._caches: dict[str, BoundCache] = {}  # per precision (_cache_for)
        self._total: int | None = None  # the input's size, when the caller knows it
        self.dim: int = int(getattr(engine, "dim", 0) or self.model.dim)
        if not lazy:
            self.start()

    def start(self) -> None:
        """Start the executor now (what ``lazy=False`` does in the constructor)."""
        self.dim = self.executor.dim

    @property
    def executor(self) -> Executor:
        """The executor, started on first use (``lazy=True``) or in the constructor, by the
        one construction path (``placement.start_executor``)."""
        if self._executor is None:
            self._executor = start_executor(
                self.model,
                self.placement,
                engine=self._engine,
                on_event=self.on_event,
                **self._executor_args,
            )
        return self._executor

    # -- public API -------------------------------------------------------------------------

    def options(
        self,
        *,
        prompt: str | None = None,
        prompt_name: str | None = None,
        input_type: str | None = None,
        dimensions: int | None = None,
    ) -> CallOptions:
        """A call's options checked against the model (``options.resolve_options``): the
        prompt (``prompt``, else ``prompt_name`` or ``input_type`` — query, document,
        passage — else the model's default prompt) and ``dimensions`` (Matryoshka models
        only). Raises ``options.OptionError`` (a ConfigError) naming what was wrong."""
        return resolve_options(
            self.tokenizer,
            model=self.model.name,
            width=self.dim,
            matryoshka=self.model.matryoshka,
            normalize=self.model.normalize,
            prompt=prompt,
            prompt_name=prompt_name,
            input_type=input_type,
            dimensions=dimensions,
        )

    def embed(
        self,
        texts: Sequence[str],
        *,
        prompt: str | None = None,
        prompt_name: str | None = None,
        input_type: str | None = None,
        dimensions: int | None = None,
    ) -> Vectors:
        """(len(texts), dim) float32 in input order (L2-normalised when the model has a
        Normalize module, as sentence-transformers returns them). ``prompt``,
        ``prompt_name``, ``input_type`` and ``dimensions``: see ``options``; without any, the
        model's default prompt applies (as in sentence-transformers) and vectors are whole."""
        opts = self.options(
            prompt=prompt, prompt_name=prompt_name, input_type=input_type, dimensions=dimensions
        )
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise InputError(f"text {i} is {type(t).__name__}, not str")
        parts = [w.vectors for w in self.stream(texts, options=opts)]
        errs = self.last_report.item_errors
        if errs:
            e = errs[0]
            raise InputError(
                f"{len(errs)} text(s) could not be embedded; first: {e.message}", item_id=e.id
            )
        if not parts:
            return np.zeros((0, opts.dimensions or self.dim), dtype=np.float32)
        out: Vectors = np.concatenate(parts)
        return out

    def stream(
        self,
        items: Iterable[str] | Iterable[tuple[str, str]],
        texts: Iterable[str] | None = None,
        stop: threading.Event | None = None,
        *,
        options: CallOptions | None = None,
        total: int | None = None,
    ) -> Iterator[WindowResult]:
        """Yield one ``WindowResult`` per window, in input order: FIRST_WINDOW_ITEMS items,
        each next window twice the last, up to WINDOW_ITEMS.

        ``items``: any iterable, read lazily window by window (a generator, a file reader;
        no ``len`` needed): texts (their ids are their positions), or ``(id, text)`` pairs
        (``inputs.Chunk``); or ids, with their texts in ``texts``. The job holds at most
        three windows of texts whatever the input's size: the one being run, the next one
        being prepared meanwhile, and the one the caller is writing. ``total``: the input's
        size, if the caller knows it (progress events); ``last_report.chunks`` counts what was
        read.

        ``options``: the call's prompt and dimensions (``Embedder.options``; None: the
        model's default prompt, whole vectors). Rows whose ``ok`` is False hold zeros: failed
        items (listed in ``last_report.item_errors``) or, after ``stop`` was set, items never
        run. When ``stop`` is set, intake stops, in-flight batches finish, the interrupted
        window is yielded with what it has, and the generator returns
        (``last_report.interrupted`` is True)."""
        opts = options if options is not None else self.options()
        report = JobReport()
        self.last_report = report
        self._total = total
        t0 = time.perf_counter()
        source = _pairs(items, texts)

        def take(start: int, size: int) -> _Window | None:
            chunk = list(itertools.islice(source, size))
            if not chunk:
                return None
            report.chunks += len(chunk)
            ids, window_texts = [c[0] for c in chunk], [c[1] for c in chunk]
            del chunk
            return self._prepare_window(start, ids, window_texts, opts.prompt)

        with ThreadPoolExecutor(1, thread_name_prefix="embedpool-prepare") as prep:
            size = min(FIRST_WINDOW_ITEMS, WINDOW_ITEMS)
            nxt: Future[_Window | None] = prep.submit(take, 0, size)
            while True:
                window = nxt.result()
                if window is None:
                    break
                start = window.start + len(window.ids)
                size = min(2 * size, WINDOW_ITEMS)
                stopped = stop is not None and stop.is_set()
                if not stopped:  # the next window is read and prepared while this one runs
                    nxt = prep.submit(take, start, size)
                ok = self._execute(window, report, stop)
                report.seconds = time.perf_counter() - t0
                report.device = self.device
                prepared = window.prep
                yield WindowResult(
                    window.start, window.ids, opts.shape(prepared.rows()), ok[prepared.inverse]
                )
                del window, prepared
                if stop is not None and stop.is_set():
                    # interrupted: mid-window, or with input left (the next window; when
                    # stopped before it was taken, nxt is still this one: input may be left)
                    report.interrupted = not ok.all() or nxt.result() is not None
                    return
        report.seconds = time.perf_counter() - t0

    @property
    def device(self) -> str:
        """Where the model runs, in one line: the device executor's members and fallbacks
        once it runs, else the placement."""
        describe = getattr(self._executor, "describe", None)
        text = describe() if callable(describe) else self.placement.device.describe()
        on = " on OpenVINO" if self.placement.runtime == "openvino" else ""
        return f"{text}, {self.precision}{on}"

    def close(self) -> None:
        if self._executor is not None:
            self._executor.close()

    def __enter__(self) -> Embedder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- steps ------------------------------------------------------------------------------

    def _prepare(
        self, start: int, ids: Sequence[str], texts: Sequence[str], prompt: str | None = None
    ) -> _Window:
        """The window of ``ids``/``texts`` that begins at ``start`` (benchmarks' view of the
        prepare step: dedupe, cache lookup, tokenise, plan)."""
        return self._prepare_window(
            start,
            list(ids[start : start + WINDOW_ITEMS]),
            texts[start : start + WINDOW_ITEMS],
            self.options().prompt if prompt is None else prompt,
        )

    def _prepare_window(
        self, start: int, ids: list[str], texts: Sequence[str], prompt: str
    ) -> _Window:
        """A window ready to run: the shared prepare step (``prepare.prepare``), then its
        batches planned under the token budget."""
        prepared = prepare(
            texts,
            self.tokenizer,
            self.long_text,
            self.dim,
            prompt=prompt,
            cache=self._cache_for(None),
        )
        enc = prepared.encoded
        first_id: dict[int, str] = {}
        for i, u in enumerate(prepared.inverse):
            first_id.setdefault(u, ids[i])
        batches: list[WorkBatch] = []
        positions: dict[int, tuple[int, ...]] = {}
        for b in plan_batches(
            [len(s) for s in enc.sequences], self.batch_tokens, self.max_batch_items
        ):
            batch_id = start + len(batches)  # unique per job: a window has < WINDOW_ITEMS batches
            positions[batch_id] = b.indices
            batches.append(
                WorkBatch(
                    batch_id=batch_id,
                    sequences=tuple(enc.sequences[i] for i in b.indices),
                    item_ids=tuple(first_id[prepared.missing[enc.owner[i]]] for i in b.indices),
                    prompt_lengths=(enc.prompt_length,) * len(b.indices)
                    if enc.prompt_length
                    else (),
                )
            )
        return _Window(
            start,
            ids,
            prepared,
            batches,
            positions,
            Assembly(enc.owner, len(prepared.missing), self.model.normalize),
        )

    def _execute(self, w: _Window, report: JobReport, stop: threading.Event | None) -> np.ndarray:
        """Run a window's batches; returns, per unique text, whether its vector is final."""
        prepared, assembly = w.prep, w.assembly
        pending = set(w.positions)
        done_so_far = report.embedded

        def feed() -> Iterator[WorkBatch]:
            for b in w.batches:
                if stop is not None and stop.is_set():
                    return
                yield b

        results = run(self.executor, feed()) if w.batches else iter(())
        for res in results:
            pending.discard(res.batch_id)
            done: list[int] = []  # missing texts whose vector just became final
            for pos, seq in enumerate(w.positions[res.batch_id]):
                if pos in res.failed:
                    assembly.fail(seq, res.failed[pos])
                else:
                    item = assembly.put(seq, res.vectors[pos])
                    if item is not None:
                        done.append(item)
            for k in done:
                prepared.vectors[prepared.missing[k]] = assembly.vector(k)
            # the cache of the graph that made them (a device executor's fallback: another)
            prepared.store(self._cache_for(res.precision), done)
            done_so_far += len(done)
            self._emit(
                events.PROGRESS,
                done=done_so_far,
                total=self._progress_total(report),
                tokens=sum(len(s) for s in res_sequences(w, res.batch_id)),
            )
        ok = np.ones(len(prepared.texts), dtype=bool)
        ok[prepared.missing] = assembly.final()
        failed = {prepared.missing[k]: why for k, why in assembly.failed.items()}
        if pending:  # interrupted: count what is final, report nothing else
            report.embedded += int(ok[prepared.inverse].sum())
            return ok
        report.tokens += prepared.sequences_tokens
        report.inferred += len(prepared.missing)
        report.cache_hits += prepared.hits()
        for i, u in enumerate(prepared.inverse):
            if not prepared.texts[u].strip():
                report.empty += 1
            if prepared.truncated[u]:
                report.truncated += 1
                if len(report.truncated_ids) < MAX_LISTED_IDS:
                    report.truncated_ids.append(w.ids[i])
            if u in failed:
                report.item_errors.append(ItemError(w.start + i, w.ids[i], failed[u]))
            else:
                report.embedded += 1
        self._emit(
            events.PROGRESS, done=report.embedded, total=self._progress_total(report), tokens=0
        )
        return ok

    def _progress_total(self, report: JobReport) -> int:
        return self._total if self._total is not None else report.chunks

    def _cache_for(self, precision: str | None) -> BoundCache | None:
        """The cache bound to the fingerprint of the graph that made a batch: a batch a
        device executor ran in another precision (CPU workers next to a GPU, a fallback) is
        keyed by that precision, never by the job's (None: the job's)."""
        if self.cache is None:
            return None
        chosen = precision or self.precision
        hook = self._caches.get(chosen)
        if hook is None:
            from embedpool.cache import BoundCache

            fingerprint = self.fingerprint
            if chosen != self.precision:
                fingerprint = self.model.fingerprint(
                    chosen,
                    self.long_text,
                    graph=graph_id(self.model, chosen, self.placement.runtime),
                )
            hook = self._caches[chosen] = BoundCache(self.cache, fingerprint)
        return hook


def res_sequences(w: _Window, batch_id: int) -> list[TokenIds]:
    """The sequences of one of a window's batches."""
    return [w.prep.encoded.sequences[i] for i in w.positions[batch_id]]


def _pairs(
    items: Iterable[str] | Iterable[tuple[str, str]], texts: Iterable[str] | None
) -> Iterator[tuple[str, str]]:
    """``(id, text)`` pairs from ``stream``'s arguments, lazily; a text that is not a str is
    an InputError naming its position."""
    pairs: Iterable[Any] = zip(items, texts, strict=True) if texts is not None else items
    for n, item in enumerate(pairs):
        if isinstance(item, str):
            pair: tuple[Any, Any] = (str(n), item)
        elif isinstance(item, tuple) and len(item) == 2:
            pair = item
        else:
            raise InputError(
                f"item {n} is {type(item).__name__}: expected a text or an (id, text) pair"
            )
        if not isinstance(pair[1], str):
            raise InputError(f"text {n} is {type(pair[1]).__name__}, not str")
        yield pair


def embed(
    texts: Sequence[str],
    model: str | Path = DEFAULT_MODEL,
    precision: str = DEFAULT_PRECISION,
    device: str = "auto",
    *,
    prompt: str | None = None,
    prompt_name: str | None = None,
    input_type: str | None = None,
    dimensions: int | None = None,
    **kwargs: Any,
) -> Vectors:
    """One-shot helper: load the model, embed, release. Use ``Embedder`` for repeated calls.
    ``device``: "auto", "cpu" or "cuda[:N]" (see ``Embedder``); ``prompt``, ``prompt_name``,
    ``input_type``, ``dimensions``: see ``Embedder.options``."""
    with Embedder(model, precision=precision, device=device, **kwargs) as e:
        return e.embed(
            texts,
            prompt=prompt,
            prompt_name=prompt_name,
            input_type=input_type,
            dimensions=dimensions,
        )
