"""Reranking: a query and documents in, the documents' relevance scores out, best first, from
a cross-encoder (``models.crossencoder``) run torch-free like the embedders.

    >>> from embedpool import Reranker
    >>> with Reranker("path/to/ms-marco-MiniLM-L6-v2") as r:
    ...     r.rank("how to add numbers", ["def add(a, b): ...", "the fox"], top_n=1)
    [Ranked(index=0, score=8.61..., document='def add(a, b): ...')]

A pair becomes model input as sentence-transformers' ``CrossEncoder`` makes it: the
tokenizer's own pair template (``tokenizer.json``'s post-processor: ``[CLS] q [SEP] d [SEP]``
with token types 0/1 for BERT, ``<s> q </s></s> d </s>`` for XLM-R), and the scores are
``CrossEncoder.predict``'s: the logits, then the activation the model's config names
(``ClassifierSpec.activation``; ``raw=True`` skips it, TEI's ``raw_scores``).

A causal-LM reranker (Qwen3-Reranker, ``ClassifierSpec.kind == "causal_lm"``) has no pair
template in its tokenizer: the pair is rendered by the model's chat template from the
messages ``query`` and ``document`` (and ``system``: the ``instruction``), as CrossEncoder 6.3
renders it (``PairTemplate``, jinja2 in transformers' sandbox settings), and tokenised
without added special tokens. The template is rendered once per reranker with stand-ins, so
a pair's text is ``before + query + middle + document + after``, and the document's tokens
are found by their offsets.

Truncation (the choice, and why): a pair longer than the model's window loses tokens from the
**document's end only, never the query** (``tokenizers``' ``only_second``), and the pair is
reported (``RerankReport.truncated``, the CLI's ``truncated``, the routes' warnings): a
reranker judges the document against the whole question. CrossEncoder truncates
``longest_first``, which cuts only the document too as long as the query is at most about half
the window; the scores are then equal. Only a query longer than that is scored differently
(CrossEncoder would cut the query as well), and a query that leaves no room for any document
token is refused (``InputError``). A causal-LM reranker's pair keeps its template's text after
the document (CrossEncoder cuts the rendered pair's tail and restores the template's suffix:
the same tokens when only the document is cut).

Pairs go through the embedders' machinery: one ``WorkBatch`` sequence per pair, cut to the
token budget (``batching.plan_batches``), run by any executor (in-process, the pool, Ray:
``placement.start_executor``) under the same fault policy; a pair's first-segment length
travels as the batch's ``prompt_lengths`` (the engine turns it into token types,
``Engine(segments=True)``); the logits are cached under the model's fingerprint, keyed on
query and document (``pair_key``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tokenizers import Tokenizer

from embedpool import events
from embedpool.batching import plan_batches
from embedpool.errors import ConfigError, InputError
from embedpool.executor import Executor, WorkBatch, run
from embedpool.models import ResolvedModel, resolve_model
from embedpool.modelspec import ScoreActivation
from embedpool.tokenization import TextTokenizer
from embedpool.types import EventCallback, Precision, TokenIds

if TYPE_CHECKING:
    from embedpool.cache import VectorCache

log = logging.getLogger(__name__)

#: Documents of one ``rank`` call, at most (a query against more is a search, not a rerank;
#: the server's item limit applies there too).
MAX_DOCUMENTS = 100_000


def pair_key(query: str, document: str) -> bytes:
    """The cache key of a [query, document] pair: sha256 of both, length-prefixed so that no
    split of one string between the two gives the same key."""
    q = query.encode("utf-8", "surrogatepass")
    return sha256(
        b"pair\0" + len(q).to_bytes(8, "big") + q + document.encode("utf-8", "surrogatepass")
    ).digest()


def activate(logits: np.ndarray, activation: ScoreActivation) -> np.ndarray:
    """CrossEncoder.predict's activation on float32 logits."""
    x = np.asarray(logits, dtype=np.float32)
    if activation == "sigmoid":
        out: np.ndarray = (1.0 / (1.0 + np.exp(-x))).astype(np.float32)
        return out
    if activation == "tanh":
        return np.tanh(x).astype(np.float32)
    return x


@dataclass(frozen=True)
class EncodedPairs:
    """Pairs as model input: one sequence each, its first segment's length (``[CLS] q
    [SEP]``: where token type 1 starts), and which pairs lost document tokens."""

    sequences: list[TokenIds]
    segments: list[int]
    truncated: list[bool]
    n_tokens: list[int]  # per pair, before truncation


class PairTemplate:
    """A chat template that renders a [query, document] pair (a causal-LM reranker's), split
    once into the text around the two: ``before + query + middle + document + after``.

    Rendered as transformers' ``apply_chat_template`` renders (jinja2's sandbox, trim_blocks,
    lstrip_blocks, loop controls, ``raise_exception``, ``tojson``; the tokenizer's special
    tokens as variables) with the messages CrossEncoder hands it: ``system`` (the
    instruction, when one is given), ``query``, ``document``."""

    _STANDINS = (("\ue000q\ue001", "\ue000d\ue001"), ("\ue002Q\ue003", "\ue002D\ue003"))

    def __init__(
        self,
        source: str,
        *,
        instruction: str | None = None,
        variables: dict[str, str] | None = None,
    ) -> None:
        import json

        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
        env.globals["raise_exception"] = raise_exception
        try:
            template = env.from_string(source)
        except TemplateError as exc:
            raise ConfigError(f"the model's chat template does not compile: {exc}") from exc
        parts = []
        for q, d in self._STANDINS:
            messages = ([{"role": "system", "content": instruction}] if instruction else []) + [
                {"role": "query", "content": q},
                {"role": "document", "content": d},
            ]
            try:
                text = template.render(
                    messages=messages, add_generation_prompt=False, **(variables or {})
                )
            except Exception as exc:  # jinja's errors, or a filter's on unexpected content
                raise ConfigError(f"the model's chat template fails on a pair: {exc}") from exc
            if text.count(q) != 1 or text.count(d) != 1 or text.index(q) > text.index(d):
                raise ConfigError(
                    "the model's chat template does not render the query once "
                    "and then the document once; embedpool cannot rank with it"
                )
            before, rest = text.split(q)
            middle, after = rest.split(d)
            parts.append((before, middle, after))
        if parts[0] != parts[1]:
            raise ConfigError(
                "the model's chat template renders differently around different "
                "texts; embedpool cannot split it into a prompt around the pair"
            )
        self.before, self.middle, self.after = parts[0]

    def render(self, query: str, document: str) -> tuple[str, int, int]:
        """The pair's text and where the document starts and ends in it (characters)."""
        start = len(self.before) + len(query) + len(self.middle)
        return (
            self.before + query + self.middle + document + self.after,
            start,
            start + len(document),
        )


class PairTokenizer:
    """A model's tokenizer (``TextTokenizer``'s, with the normalizer transformers uses)
    applied to [query, document] pairs through its own pair template (or, for a causal-LM
    reranker, its chat template: ``template``); documents are cut to the window, queries
    never (see the module docstring)."""

    def __init__(self, text: TextTokenizer, template: PairTemplate | None = None) -> None:
        self.max_length = text.max_length
        self.template = template
        self._full = Tokenizer.from_str(text.backend.to_str())
        self._full.no_truncation()
        self._full.no_padding()
        self._cut = Tokenizer.from_str(self._full.to_str())
        self._cut.enable_truncation(self.max_length, strategy="only_second")
        self.specials = self._full.num_special_tokens_to_add(True)

    @classmethod
    def for_model(cls, model: ResolvedModel, *, instruction: str | None = None) -> PairTokenizer:
        """``instruction``: a causal-LM reranker's instruction (CrossEncoder's ``prompt``,
        rendered as the ``system`` message; the template's default without one)."""
        spec = model.classifier
        if spec is None or spec.kind != "causal_lm":
            if instruction:
                raise ConfigError(
                    f"{model.name} takes no instruction (only a causal-LM "
                    "reranker such as Qwen3-Reranker renders one)"
                )
            return cls(TextTokenizer.for_model(model))
        return cls(
            TextTokenizer.for_model(model),
            PairTemplate(
                spec.pair_template, instruction=instruction, variables=_special_tokens(model)
            ),
        )

    def query_tokens(self, query: str) -> int:
        """The query's tokens without special tokens."""
        return len(self._full.encode(query, add_special_tokens=False).ids)

    def encode(self, pairs: Sequence[tuple[str, str]]) -> EncodedPairs:
        """Model-ready sequences of ``pairs``; InputError for a query that leaves no room for
        a document token (naming its length and the window)."""
        if not pairs:
            return EncodedPairs([], [], [], [])
        if self.template is not None:
            return self._encode_rendered(pairs, self.template)
        try:
            encs = self._cut.encode_batch(list(pairs))
        except Exception:  # tokenizers: "Sequence to truncate too short ..."
            longest = max(self.query_tokens(q) for q, _ in pairs)
            raise InputError(
                f"the query is {longest} tokens; with the model's window of {self.max_length} "
                f"tokens and the pair's {self.specials} special tokens no document token would "
                "fit (rerank truncates documents, never the query): shorten the query"
            ) from None
        sequences: list[TokenIds] = []
        segments: list[int] = []
        truncated: list[bool] = []
        n_tokens: list[int] = []
        for enc in encs:
            ids = np.asarray(enc.ids, dtype=np.int32)
            types = np.asarray(enc.type_ids, dtype=np.int8)
            ones = np.flatnonzero(types)
            first = int(ones[0]) if ones.size else int(ids.size)
            if ones.size and not (types[first:] == 1).all():
                raise InputError(
                    "the tokenizer's pair template gives token types that are not "
                    "one query segment then one document segment"
                )
            sequences.append(ids)
            segments.append(first)
            cut = sum(len(o.ids) for o in enc.overflowing[:1])
            truncated.append(bool(enc.overflowing))
            n_tokens.append(int(ids.size) + cut)
        return EncodedPairs(sequences, segments, truncated, n_tokens)

    def _encode_rendered(
        self, pairs: Sequence[tuple[str, str]], template: PairTemplate
    ) -> EncodedPairs:
        """Pairs rendered by a chat template, tokenised whole (no special tokens added, as
        apply_chat_template), the document's tokens cut from its end when the pair is longer
        than the window (the template's text after it is kept)."""
        rendered = [template.render(q, d) for q, d in pairs]
        encs = self._full.encode_batch([text for text, _, _ in rendered], add_special_tokens=False)
        sequences: list[TokenIds] = []
        truncated: list[bool] = []
        n_tokens: list[int] = []
        for i, (enc, (_, start, end)) in enumerate(zip(encs, rendered, strict=True)):
            ids = np.asarray(enc.ids, dtype=np.int32)
            n = int(ids.size)
            n_tokens.append(n)
            excess = n - self.max_length
            if excess <= 0:
                sequences.append(ids)
                truncated.append(False)
                continue
            offsets = enc.offsets
            doc_end = next((j for j, (a, _) in enumerate(offsets) if a >= end), n)
            doc_start = next((j for j, (_, b) in enumerate(offsets) if b > start), doc_end)
            doc_start = min(doc_start, doc_end)
            if doc_end - doc_start < excess:
                fixed = n - (doc_end - doc_start)
                raise InputError(
                    f"pair {i}: the query and the model's prompt template take {fixed} tokens; "
                    f"with the model's window of {self.max_length} tokens no document token "
                    "would fit (rerank truncates documents, never the query): shorten the "
                    "query",
                    item_id=str(i),
                )
            sequences.append(np.concatenate([ids[: doc_end - excess], ids[doc_end:]]))
            truncated.append(True)
        return EncodedPairs(sequences, [0] * len(sequences), truncated, n_tokens)


def _special_tokens(model: ResolvedModel) -> dict[str, str]:
    """The tokenizer's special tokens as transformers hands them to a chat template
    (``bos_token``, ``eos_token``, ...: tokenizer_config.json's strings)."""
    import json

    ref = model.files.by_role("tokenizer_config")
    try:
        cfg = json.loads(ref.path.read_text(encoding="utf-8")) if ref is not None else {}
    except (OSError, ValueError):
        cfg = {}
    out: dict[str, str] = {}
    for key in (
        "bos_token",
        "eos_token",
        "unk_token",
        "sep_token",
        "pad_token",
        "cls_token",
        "mask_token",
    ):
        value = cfg.get(key) if isinstance(cfg, dict) else None
        if isinstance(value, dict):  # an AddedToken's dict
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    return out


@dataclass(frozen=True)
class Ranked:
    """One document's place in a ranking: its index in the input, its score, and itself."""

    index: int
    score: float
    document: str


@dataclass
class RerankReport:
    """What the last call did."""

    pairs: int = 0
    tokens: int = 0  # fed to the model (cache misses, after truncation)
    cache_hits: int = 0
    truncated: list[int] = field(default_factory=list)  # pair indices whose document was cut


class PairCache:
    """A vector cache bound to one reranker's fingerprint, keyed by [query, document]: the
    logits of pairs already scored (the server's; ``Reranker`` holds the same itself)."""

    def __init__(self, cache: VectorCache, fingerprint: str) -> None:
        self.cache = cache
        self.fingerprint = fingerprint

    def get_many(self, query: str, documents: Sequence[str]) -> list[np.ndarray | None]:
        keys = [pair_key(query, d) for d in documents]
        found = self.cache.get_many(self.fingerprint, keys)
        return [found.get(k) for k in keys]

    def put_many(self, query: str, documents: Sequence[str], logits: np.ndarray) -> None:
        self.cache.put_many(
            self.fingerprint, [(pair_key(query, d), logits[i]) for i, d in enumerate(documents)]
        )


def reranker_fingerprint(
    model: ResolvedModel, precision: Precision, runtime: str = "onnxruntime"
) -> str:
    """What keys a reranker's cached logits: its files, precision and graph (the runtime's:
    OpenVINO's int8 is another recipe than ONNX Runtime's, and scores otherwise)."""
    from embedpool.graph import graph_id

    return model.fingerprint(precision, "pairs", graph=graph_id(model, precision, runtime))


def check_reranker(model: ResolvedModel) -> None:
    """ConfigError unless ``model`` is a cross-encoder with one score per pair."""
    if model.classifier is None:
        raise ConfigError(
            f"{model.name} is not a cross-encoder (config.json architectures: "
            f"{model.config.get('architectures')}); rerank needs a "
            "*ForSequenceClassification model such as "
            "cross-encoder/ms-marco-MiniLM-L6-v2 or BAAI/bge-reranker-base, "
            "or a causal-LM reranker such as Qwen/Qwen3-Reranker-0.6B"
        )
    if model.classifier.num_labels != 1:
        raise ConfigError(
            f"{model.name} has {model.classifier.num_labels} labels "
            f"({', '.join(model.classifier.labels)}); ranking needs one score "
            "per pair (num_labels 1), as CrossEncoder.rank does"
        )


class Reranker:
    """Loads a cross-encoder once and scores any number of [query, document] pairs.

    The executor options are the ``Embedder``'s: ``workers=None`` runs the engine in this
    process, ``"auto"`` or an int the adaptive pool, ``backend="ray"`` Ray actors;
    ``precision`` "auto" is int8 on the CPU (fp32 equals CrossEncoder within 1e-4;
    int8 ranks as it: per query Spearman mean >= 0.99, worst 0.98, tests/test_rerank.py;
    its linears' rounding, not the word table, swaps near-tied documents); ``runtime``: the
    CPU's inference runtime, as the ``Embedder``'s ("auto", "onnxruntime", "openvino"; None:
    ``EMBEDPOOL_ENGINE``, else "auto"; the fidelity tests run on both); ``cache`` keeps the
    logits of pairs already scored; ``engine``: a custom engine recipe (tests);
    ``instruction``: a causal-LM reranker's task instruction (Qwen3-Reranker's
    ``<Instruct>``; CrossEncoder's ``prompt``), the template's default without one.
    """

    def __init__(
        self,
        model: str | Path | ResolvedModel,
        *,
        precision: str = "auto",
        threads: int | None = None,
        workers: int | str | None = None,
        batch_tokens: int | None = None,
        max_batch_items: int | None = None,
        cache: VectorCache | None = None,
        backend: str = "local",
        ray_address: str | None = None,
        pool_options: dict[str, Any] | None = None,
        on_event: EventCallback | None = None,
        engine: Any = None,
        lazy: bool = False,
        device: str = "cpu",
        instruction: str | None = None,
        runtime: str | None = None,
    ) -> None:
        from embedpool.device_choice import DevicePlan
        from embedpool.placement import place, prepare_graphs

        self.model = model if isinstance(model, ResolvedModel) else resolve_model(model)
        check_reranker(self.model)
        assert self.model.classifier is not None
        self.classifier = self.model.classifier
        custom = DevicePlan.for_recipe(engine, device)
        self.placement = place(
            self.model,
            device=device,
            precision=precision,
            batch_tokens=batch_tokens,
            max_batch_items=max_batch_items,
            backend=backend,
            plan=custom,
            profile=(pool_options or {}).get("profile"),
            engine=runtime,
        )
        self.on_event = on_event
        self._emit = events.Emitter(on_event, log)
        if engine is None:  # the graph built before any worker starts, as for embedders
            self.placement = prepare_graphs(
                self.model,
                self.placement,
                self._emit,
                max_memory=(pool_options or {}).get("max_memory_bytes"),
            )
        self.precision: Precision = self.placement.precision
        self.tokenizer = PairTokenizer.for_model(self.model, instruction=instruction)
        self.cache = cache
        self.fingerprint = reranker_fingerprint(self.model, self.precision, self.placement.runtime)
        if instruction:  # the same pair scores differently under another instruction
            self.fingerprint += (
                ":" + sha256(instruction.encode("utf-8", "surrogatepass")).hexdigest()[:16]
            )
        self.last_report = RerankReport()
        self._engine = engine
        self._executor_args: dict[str, Any] = {
            "workers": workers,
            "threads": threads,
            "backend": backend,
            "ray_address": ray_address,
            "pool_options": pool_options or {},
        }
        self._executor: Executor | None = None
        self._batch_ids = 0
        if not lazy:
            _ = self.executor

    @property
    def executor(self) -> Executor:
        """The executor (``placement.start_executor``, the embedders' one construction path),
        started in the constructor or on first use (``lazy=True``)."""
        if self._executor is None:
            from embedpool.placement import start_executor

            self._executor = start_executor(
                self.model,
                self.placement,
                engine=self._engine,
                on_event=self.on_event,
                **self._executor_args,
            )
        return self._executor

    @property
    def activation(self) -> ScoreActivation:
        return self.classifier.activation

    # -- public API ---------------------------------------------------------------------------

    def rank(
        self, query: str, documents: Sequence[str], top_n: int | None = None, *, raw: bool = False
    ) -> list[Ranked]:
        """``documents`` by relevance to ``query``, best first (ties in input order), at most
        ``top_n`` of them. Scores as ``CrossEncoder.rank`` gives them (``raw``: the logits)."""
        if top_n is not None and (
            isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1
        ):
            raise InputError(f"top_n must be a positive integer, got {top_n!r}")
        scores = self.score(query, documents, raw=raw)
        order = np.argsort(-scores, kind="stable")[:top_n]
        return [Ranked(int(i), float(scores[i]), documents[i]) for i in order]

    def score(self, query: str, documents: Sequence[str], *, raw: bool = False) -> np.ndarray:
        """One score per document, in input order (float32)."""
        if not isinstance(query, str):
            raise InputError(f"the query is {type(query).__name__}, not str")
        if isinstance(documents, str):
            raise InputError("documents must be a list of strings, not one string")
        for i, d in enumerate(documents):
            if not isinstance(d, str):
                raise InputError(f"document {i} is {type(d).__name__}, not str")
        if len(documents) > MAX_DOCUMENTS:
            raise InputError(f"{len(documents)} documents; at most {MAX_DOCUMENTS} per call")
        logits = self.logits([(query, d) for d in documents])
        return activate(logits[:, 0], "identity" if raw else self.activation)

    def predict(self, pairs: Sequence[tuple[str, str]], *, raw: bool = False) -> np.ndarray:
        """``CrossEncoder.predict``: (n,) scores for one-label models, else (n, num_labels)."""
        for i, p in enumerate(pairs):
            if not (
                isinstance(p, (tuple, list))
                and len(p) == 2
                and isinstance(p[0], str)
                and isinstance(p[1], str)
            ):
                raise InputError(f"pair {i} is not a [query, document] pair of strings")
        logits = self.logits([(p[0], p[1]) for p in pairs])
        out = activate(logits, "identity" if raw else self.activation)
        return out[:, 0] if self.classifier.num_labels == 1 else out

    def logits(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        """(len(pairs), num_labels) float32 logits in input order; the cache first, the
        misses through the executor in token-budget batches."""
        report = RerankReport(pairs=len(pairs))
        self.last_report = report
        out = np.zeros((len(pairs), self.classifier.num_labels), dtype=np.float32)
        keys = [pair_key(q, d) for q, d in pairs]
        todo = list(range(len(pairs)))
        if self.cache is not None and pairs:
            found = self.cache.get_many(self.fingerprint, keys)
            todo = [i for i, k in enumerate(keys) if k not in found]
            for i, k in enumerate(keys):
                if k in found:
                    out[i] = found[k]
            report.cache_hits = len(pairs) - len(todo)
        enc = self.tokenizer.encode([pairs[i] for i in todo])
        report.truncated = [todo[j] for j, t in enumerate(enc.truncated) if t]
        report.tokens = sum(len(s) for s in enc.sequences)
        if report.truncated:
            log.info(
                "rerank: %d document(s) cut to the %d-token window (pairs %s)",
                len(report.truncated),
                self.tokenizer.max_length,
                report.truncated[:10],
            )
        batches: list[WorkBatch] = []
        positions: dict[int, tuple[int, ...]] = {}
        segments = self.classifier.token_types
        for b in plan_batches(
            [len(s) for s in enc.sequences],
            self.placement.batch_tokens,
            self.placement.max_batch_items,
        ):
            self._batch_ids += 1
            positions[self._batch_ids] = b.indices
            batches.append(
                WorkBatch(
                    self._batch_ids,
                    tuple(enc.sequences[j] for j in b.indices),
                    tuple(f"pair {todo[j]}" for j in b.indices),
                    prompt_lengths=tuple(enc.segments[j] for j in b.indices) if segments else (),
                )
            )
        failed: list[tuple[int, str]] = []
        for res in run(self.executor, batches) if batches else ():
            done: list[int] = []
            for pos, j in enumerate(positions[res.batch_id]):
                if pos in res.failed:
                    failed.append((todo[j], res.failed[pos]))
                else:
                    out[todo[j]] = res.vectors[pos]
                    done.append(todo[j])
            if self.cache is not None and done:
                self.cache.put_many(self.fingerprint, [(keys[i], out[i]) for i in done])
        if failed:
            i, why = min(failed)
            raise InputError(
                f"{len(failed)} pair(s) could not be scored; first: pair {i}: {why}", item_id=str(i)
            )
        return out

    def close(self) -> None:
        if self._executor is not None:
            self._executor.close()

    def __enter__(self) -> Reranker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def rerank(
    query: str, documents: Sequence[str], model: str | Path, top_n: int | None = None, **kwargs: Any
) -> list[Ranked]:
    """One-shot helper: load the reranker, rank, release. Use ``Reranker`` for repeated calls."""
    with Reranker(model, **kwargs) as r:
        return r.rank(query, documents, top_n)
