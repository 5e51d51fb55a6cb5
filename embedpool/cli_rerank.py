"""``embedpool rerank``: a query and documents in, one JSON document out, best first.

    embedpool rerank "how do I add numbers" "def add(a, b): ..." "the fox" -m RERANKER
    embedpool rerank "query" -i docs.jsonl -m RERANKER --top-n 5
    cat docs.txt | embedpool rerank "query" -m RERANKER        # one document per line

Output: ``{"model", "query", "results": [{"index", "id"?, "score", "document"?}],
"truncated": [indices]}`` (``id`` for documents read with ``--input``, as ``embed`` reads
them). Bad input (no documents, a query longer than the window, a model that is not a
cross-encoder, a bad option) exits 2 with one line naming it. Registered on the CLI group by
``embedpool.cli``; kept here so the rerank command is one module.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from embedpool.cli import (
    EXIT_FAILED,
    EXIT_USAGE,
    _fail,
    _pool_args,
    device_opt,
    engine_opt,
    max_memory_opt,
    profile_opt,
    threads_opt,
    workers_opt,
)
from embedpool.config import env_str
from embedpool.errors import CacheError, ConfigError, EmbedpoolError

if TYPE_CHECKING:
    from embedpool.server.rerank import RerankerSetup


@click.command()
@click.argument("query")
@click.argument("documents", nargs=-1)
@click.option(
    "--input",
    "-i",
    "inputs",
    multiple=True,
    type=click.Path(path_type=Path),
    help="JSONL records, text files or directories, read as `embed` reads them "
    "(each record's id is echoed). Without DOCUMENTS or --input: one document "
    "per line of stdin.",
)
@click.option(
    "--model",
    "-m",
    default=lambda: env_str("EMBEDPOOL_RERANKER") or None,
    help="The cross-encoder: a model directory or hub id (or EMBEDPOOL_RERANKER).",
)
@click.option(
    "--top-n",
    type=click.IntRange(1),
    default=None,
    help="Return the best N documents (default: all).",
)
@click.option(
    "--raw",
    is_flag=True,
    help="Logits instead of the model's activation (CrossEncoder.predict's scores).",
)
@click.option("--no-documents", is_flag=True, help="Leave the documents' text out of the output.")
@click.option(
    "--instruction",
    default=None,
    help="A causal-LM reranker's task instruction (Qwen3-Reranker's <Instruct>; "
    "CrossEncoder's prompt). Default: its template's own.",
)
@click.option(
    "--precision",
    type=click.Choice(["auto", "int8", "fp32", "bf16"]),
    default="auto",
    show_default=True,
    help="auto: per CPU from measurements, as embed's (int8 on ONNX Runtime, or bf16 on "
    "OpenVINO where it measured faster); bf16 needs avx512_bf16 or AMX.",
)
@engine_opt
@device_opt
@threads_opt
@workers_opt
@profile_opt
@max_memory_opt
@click.option("--cache", "cache_path", type=click.Path(path_type=Path), default=None)
@click.option("--no-cache", is_flag=True)
def rerank(
    query: str,
    documents: tuple[str, ...],
    inputs: tuple[Path, ...],
    model: str | None,
    top_n: int | None,
    raw: bool,
    no_documents: bool,
    instruction: str | None,
    precision: str,
    engine: str,
    device: str,
    threads: int | None,
    workers: str,
    profile: str,
    max_memory: str | None,
    cache_path: Path | None,
    no_cache: bool,
) -> None:
    """Rank DOCUMENTS by relevance to QUERY with a cross-encoder, best first (scores as
    sentence-transformers' CrossEncoder gives them); a document too long for the window loses
    its end, never the query, and is listed in ``truncated``."""
    from embedpool.rerank import Reranker

    if model is None:
        _fail(
            "--model is required: a cross-encoder directory or hub id (e.g. "
            "cross-encoder/ms-marco-MiniLM-L6-v2)",
            EXIT_USAGE,
        )
    assert model is not None
    docs = list(documents)
    ids: list[str] | None = None
    cache = None
    try:
        if inputs:
            from embedpool.inputs import read_inputs

            parsed = read_inputs(list(inputs))
            if parsed.errors:
                raise ConfigError(f"input error: {parsed.errors[0]}")
            ids = [str(i) for i in range(len(docs))] + [c.id for c in parsed.chunks]
            docs += [c.text for c in parsed.chunks]
        elif not docs:
            docs = [line.rstrip("\r\n") for line in sys.stdin]
        if not docs:
            raise ConfigError(
                "no documents: give them as arguments, with --input, or one per line on stdin"
            )
        w, pool_opts = _pool_args(workers, threads, profile, max_memory)
        if not no_cache:
            from embedpool.cache import VectorCache

            cache = VectorCache.open(cache_path)
        reranker = Reranker(
            model,
            precision=precision,
            device=device,
            threads=threads,
            workers=w,
            pool_options=pool_opts,
            cache=cache,
            instruction=instruction,
            runtime=engine,
        )
    except (EmbedpoolError, ConfigError, CacheError) as exc:
        _fail(str(exc), EXIT_USAGE)
    try:
        with reranker:
            ranked = reranker.rank(query, docs, top_n, raw=raw)
            truncated = reranker.last_report.truncated
    except ConfigError as exc:
        _fail(str(exc), EXIT_USAGE)
    except EmbedpoolError as exc:
        code = EXIT_USAGE if isinstance(exc, ValueError) else EXIT_FAILED
        _fail(str(exc), code)
    finally:
        if cache is not None:
            cache.close()
    results = []
    for r in ranked:
        item: dict[str, object] = {"index": r.index}
        if ids is not None:
            item["id"] = ids[r.index]
        item["score"] = r.score
        if not no_documents:
            item["document"] = r.document
        results.append(item)
    json.dump(
        {"model": reranker.model.name, "query": query, "results": results, "truncated": truncated},
        sys.stdout,
        ensure_ascii=False,
    )
    sys.stdout.write("\n")


def reranker_setup(
    name: str,
    *,
    device: str,
    precision: str,
    engine: str,
    workers: int | str | None,
    pool_options: dict[str, Any],
    backend: str,
    ray_address: str | None,
    actors: int | None,
    cache_path: Path | None,
    no_cache: bool,
) -> RerankerSetup:
    """``serve --reranker``: the cross-encoder resolved and checked, its graph built now (on
    screen), its executor deferred to the server's start, its cache bound; exits 2 for a
    model that is not a one-label cross-encoder."""
    from embedpool.cli import _ready_graphs
    from embedpool.models import resolve_model
    from embedpool.placement import executor_factory, place
    from embedpool.rerank import PairCache, check_reranker, reranker_fingerprint
    from embedpool.server.rerank import RerankerSetup

    try:
        model = resolve_model(name)
        check_reranker(model)
        placement = place(
            model,
            device=device,
            precision=precision if precision in ("auto", "int8", "fp32", "bf16") else "auto",
            backend=backend,
            profile=pool_options.get("profile"),
            engine=engine,
        )
    except (EmbedpoolError, ConfigError) as exc:
        _fail(f"--reranker: {exc}", EXIT_USAGE)
        raise  # unreachable
    placement = _ready_graphs(model, placement, pool_options.get("max_memory_bytes"))
    cache = None
    if not no_cache:
        from embedpool.cache import VectorCache

        try:
            cache = PairCache(
                VectorCache.open(cache_path),
                reranker_fingerprint(model, placement.precision, placement.runtime),
            )
        except CacheError as exc:
            _fail(str(exc), EXIT_USAGE)
    factory = executor_factory(
        model,
        placement,
        workers=actors if backend == "ray" else workers,
        pool_options=pool_options,
        backend=backend,
        ray_address=ray_address,
    )
    from embedpool.server.registry import planned_bytes

    # planned like an embedding model (registry.py): the server's one memory budget holds both
    return RerankerSetup(
        model,
        factory,
        cache,
        aliases=(name,),
        planned_bytes=planned_bytes(
            model,
            placement.precision,
            placement.batch_tokens,
            workers if isinstance(workers, int) else 1,
            placement.runtime,
        ),
        precision=placement.precision,
    )
