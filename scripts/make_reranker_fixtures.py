"""Dev-only: small random-weight cross-encoders (rerankers) with golden scores from
sentence-transformers' ``CrossEncoder``, for tests that run without torch.

    /work/devenv/bin/python scripts/make_reranker_fixtures.py [--out tests/fixtures/rerankers]

Needs torch, transformers and sentence-transformers (the dev venv). Three fixtures, each the
layout of a real reranker, saved by transformers and then by ``CrossEncoder.save``:

- ``bert``: ``BertForSequenceClassification`` (cross-encoder/ms-marco-MiniLM-L6-v2's layout:
  pooler + classifier, 2 token types, a WordPiece tokenizer whose pair template gives the
  document type id 1, and ``model_input_names`` with ``token_type_ids`` as BertTokenizer has).
  Its activation is the pre-v4 config.json key ``sbert_ce_default_activation_function:
  Identity`` (the ms-marco models return logits).
- ``xlmr``: ``XLMRobertaForSequenceClassification`` (bge-reranker-base's layout:
  ``classifier.dense`` + ``classifier.out_proj``, RobertaProcessing ``<s> q </s></s> d </s>``,
  no token types); the activation CrossEncoder 6.3 saves (Sigmoid, in
  config_sentence_transformers.json).
- ``modernbert``: ``ModernBertForSequenceClassification`` (gte-reranker-modernbert-base's
  layout: ``head.dense`` + ``head.norm`` + ``classifier``) with ``classifier_pooling: mean``
  and a local-attention window smaller than the pairs; no activation saved anywhere (the
  num_labels == 1 default, Sigmoid).

The weights are random (``make_family_fixtures.randomise``) but for the head's last linear,
which reads the pooled features' first principal component over the fixture's pairs
(``train_like_head``), as a trained head reads the direction relevance varies along.

Golden scores (``golden.json`` + ``golden.npz``): every query x document pair scored in one
padded batch by ``CrossEncoder.predict`` with its default activation (``scores``) and with
``activation_fn=Identity`` (``logits``). One document is longer than the window: with a short
query, CrossEncoder's ``longest_first`` truncation cuts only the document, as embedpool does.
``long_query_logits``: a query longer than half the window, paired with the long document and
tokenised with ``truncation="only_second"`` (embedpool's rule: the document is cut, never the
query), run through the same model: where CrossEncoder would also cut the query, this is
what embedpool must equal.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import sentence_transformers
import torch
import transformers
from sentence_transformers import CrossEncoder
from tokenizers import Tokenizer, processors
from transformers import PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_family_fixtures import randomise, train_tokenizer

SEED = 20241207
MAX_LEN = 64

QUERIES = [
    "how to add two numbers",
    "what is a vector cache?",
    "recherche de documents",
    "x",
]
DOCUMENTS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.",
    "class Cache(dict):\n    def __missing__(self, key):\n        value = self[key] = "
    "compute(key)\n        return value\n",
    "Ceci est une phrase en français sur la recherche de documents.",
    "x",
    "Embeddings map each text to a vector; similar texts get nearby vectors.",
    "import numpy as np\nresult = np.dot(query, document)",
    "Dies ist ein deutscher Satz über Vektoren und Suche.",
    "Esta es una frase en español sobre el aprendizaje automático.",
    "raise ValueError(\"bad input: expected a list of strings\")",
    "with open(path, encoding=\"utf-8\") as f:\n    lines = f.read().splitlines()",
    "Returns the number of tokens in the text, counting special tokens.",
    "A search engine ranks documents by relevance.",
    "The model reads long documents in windows and pools the token states.",
    "def sub(a, b):\n    return a - b\n",
    "the cache keeps vectors of texts already embedded",
    "",
    "42",
    # longer than the 64-token window with any query: the document is truncated
    "for i in range(10):\n    print(i, 'items processed')\n" * 8,
]
#: Longer than half the window: CrossEncoder's longest_first would cut it too.
LONG_QUERY = ("Embeddings map each text to a vector; similar texts get nearby vectors, and a "
              "search engine ranks documents by the cosine of their vectors to the query.")


def bert(tok: Tokenizer) -> tuple[Any, dict[str, Any]]:
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")),
                        ("[SEP]", tok.token_to_id("[SEP]"))])
    cfg = transformers.BertConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64, max_position_embeddings=MAX_LEN,
        type_vocab_size=2, num_labels=1, layer_norm_eps=1e-12, hidden_act="gelu")
    return transformers.BertForSequenceClassification(cfg), {
        "tokenizer": {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                      "unk_token": "[UNK]", "mask_token": "[MASK]",
                      "model_input_names": ["input_ids", "token_type_ids", "attention_mask"]},
        "activation": "legacy-identity"}


def xlmr(tok: Tokenizer) -> tuple[Any, dict[str, Any]]:
    tok.post_processor = processors.RobertaProcessing(
        ("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>")),
        trim_offsets=False, add_prefix_space=False)
    cfg = transformers.XLMRobertaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64, max_position_embeddings=MAX_LEN + 2,
        type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        layer_norm_eps=1e-5, hidden_act="gelu", num_labels=1)
    return transformers.XLMRobertaForSequenceClassification(cfg), {
        "tokenizer": {"bos_token": "<s>", "eos_token": "</s>", "cls_token": "<s>",
                      "sep_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
                      "mask_token": "<mask>"},
        "activation": "saved"}


def modernbert(tok: Tokenizer) -> tuple[Any, dict[str, Any]]:
    ids = {t: tok.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]")}
    cfg = transformers.ModernBertConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=4,
        num_attention_heads=2, intermediate_size=48, max_position_embeddings=MAX_LEN,
        global_attn_every_n_layers=3, local_attention=16, global_rope_theta=160000.0,
        local_rope_theta=10000.0, norm_eps=1e-5, hidden_activation="gelu",
        classifier_pooling="mean", classifier_activation="gelu", num_labels=1,
        pad_token_id=ids["[PAD]"], cls_token_id=ids["[CLS]"], bos_token_id=ids["[CLS]"],
        sep_token_id=ids["[SEP]"], eos_token_id=ids["[SEP]"])
    return transformers.ModernBertForSequenceClassification(cfg), {
        "tokenizer": {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                      "unk_token": "[UNK]", "mask_token": "[MASK]"},
        "activation": "none"}


FAMILIES = {"bert": ("wordpiece", bert), "xlmr": ("unigram", xlmr),
            "modernbert": ("bpe", modernbert)}


def fit_long_query(tokenizer: Any) -> str:
    """LONG_QUERY's first words, as many as keep it within 60% of the window: longer than
    half of it (so longest_first would cut it), short enough to leave the document room."""
    words = LONG_QUERY.split()
    n = len(words)
    while n > 1 and len(tokenizer(" ".join(words[:n]))["input_ids"]) > 0.6 * MAX_LEN:
        n -= 1
    query = " ".join(words[:n])
    if len(tokenizer(query)["input_ids"]) <= MAX_LEN // 2:
        raise SystemExit(f"no long query fits this tokenizer: {query!r}")
    return query


def set_activation(target: Path, how: str) -> None:
    """Where the activation is written, as the hub's models of each generation have it."""
    st_cfg_path = target / "config_sentence_transformers.json"
    st_cfg = json.loads(st_cfg_path.read_text())
    if how == "saved":
        return  # CrossEncoder 6.3's own: config_sentence_transformers.json activation_fn
    st_cfg.pop("activation_fn", None)
    st_cfg_path.write_text(json.dumps(st_cfg, indent=2) + "\n")
    if how == "legacy-identity":
        cfg = json.loads((target / "config.json").read_text())
        cfg["sbert_ce_default_activation_function"] = "torch.nn.modules.linear.Identity"
        (target / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def classifier_of(model: Any) -> torch.nn.Linear:
    """The head's last linear: the one that turns pooled features into the logits."""
    head = model.classifier
    return head.out_proj if hasattr(head, "out_proj") else head


def train_like_head(model: Any, tokenizer: Any, pairs: list[tuple[str, str]]) -> None:
    """Point the last linear along the pooled features' first principal component over
    ``pairs`` (logit std 3): a trained reranker's head reads the direction along which
    relevant and irrelevant pairs differ, so its scores spread far beyond the rounding of
    int8. A random head reads an arbitrary direction, where the pairs' scores bunch within
    int8's noise and any ranking test would measure that artefact, not the model."""
    linear = classifier_of(model)
    seen: list[torch.Tensor] = []
    hook = linear.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach()))
    feats = tokenizer([q for q, _ in pairs], [d for _, d in pairs], padding=True,
                      truncation="longest_first", max_length=MAX_LEN, return_tensors="pt")
    with torch.no_grad():
        model(**feats)
    hook.remove()
    x = seen[0].double()
    centred = x - x.mean(0)
    direction = torch.linalg.svd(centred, full_matrices=False).Vh[0]
    proj = centred @ direction
    scale = 3.0 / float(proj.std())
    with torch.no_grad():
        linear.weight.copy_((direction * scale).float()[None, :])
        linear.bias.fill_(float(-(x.mean(0) @ direction) * scale) + 0.5)


def build(name: str, out: Path, gen: torch.Generator) -> None:
    kind, make = FAMILIES[name]
    tok = train_tokenizer(kind)
    model, spec = make(tok)
    randomise(model, gen)
    model.eval()
    target = out / name / "model"
    if target.parent.exists():
        shutil.rmtree(target.parent)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=MAX_LEN,
                                   **spec["tokenizer"])
    # a copy tokenises for the head, so the saved tokenizer keeps no truncation state
    scratch = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tok.to_str()),
                                      model_max_length=MAX_LEN, **spec["tokenizer"])
    train_like_head(model, scratch, [(q, d) for q in QUERIES for d in DOCUMENTS])
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(tmp) / "hf"
        model.save_pretrained(str(hf_dir), safe_serialization=True)
        fast.save_pretrained(str(hf_dir))
        CrossEncoder(str(hf_dir), device="cpu").save(str(target))
    (target / "README.md").unlink(missing_ok=True)
    set_activation(target, spec["activation"])
    ce = CrossEncoder(str(target), device="cpu")  # what a user would load
    identity = torch.nn.Identity()
    pairs = [(q, d) for q in QUERIES for d in DOCUMENTS]
    scores = ce.predict(pairs, batch_size=len(pairs), convert_to_numpy=True)
    logits = ce.predict(pairs, batch_size=len(pairs), activation_fn=identity,
                        convert_to_numpy=True)
    alone = np.array([ce.predict([p], activation_fn=identity)[0] for p in pairs])
    if np.abs(alone - logits).max() > 1e-5:
        raise SystemExit(f"{name}: the reference depends on batch padding: {alone - logits}")
    features = ce.tokenizer([q for q, _ in pairs], [d for _, d in pairs], truncation="longest_first",
                            max_length=MAX_LEN)
    long_query = fit_long_query(ce.tokenizer)
    long_docs = [d for d in DOCUMENTS if len(ce.tokenizer(long_query, d)["input_ids"]) > MAX_LEN]
    lq = ce.tokenizer([long_query] * len(long_docs), long_docs, truncation="only_second",
                      max_length=MAX_LEN, padding=True, return_tensors="pt")
    with torch.no_grad():
        long_query_logits = ce.model(**lq).logits[:, 0].numpy()
    np.savez(out / name / "golden.npz", scores=scores.astype(np.float32),
             logits=logits.astype(np.float32),
             long_query_logits=long_query_logits.astype(np.float32))
    (out / name / "golden.json").write_text(json.dumps({
        "queries": QUERIES, "documents": DOCUMENTS, "long_query": long_query,
        "long_query_documents": long_docs, "max_length": MAX_LEN,
        "activation": type(ce.activation_fn).__name__,
        "input_ids": features["input_ids"],
        "token_type_ids": features.get("token_type_ids"),
        "made_by": {"torch": torch.__version__, "transformers": transformers.__version__,
                    "sentence_transformers": sentence_transformers.__version__,
                    "script": "scripts/make_reranker_fixtures.py"},
    }, indent=1, ensure_ascii=False) + "\n")
    size = sum(p.stat().st_size for p in (out / name).rglob("*") if p.is_file())
    print(f"{name}: {size / 1024:.0f} KB, activation {type(ce.activation_fn).__name__}, "
          f"pair tokens {[len(i) for i in features['input_ids']]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("tests/fixtures/rerankers"))
    ap.add_argument("--families", default=",".join(FAMILIES))
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    for name in args.families.split(","):
        build(name, args.out, gen)


if __name__ == "__main__":
    main()
