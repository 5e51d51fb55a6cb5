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
from make_decoder_fixtures import QWEN_SPLIT
from make_family_fixtures import CORPUS, randomise, train_tokenizer

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
    'raise ValueError("bad input: expected a list of strings")',
    'with open(path, encoding="utf-8") as f:\n    lines = f.read().splitlines()',
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
LONG_QUERY = (
    "Embeddings map each text to a vector; similar texts get nearby vectors, and a "
    "search engine ranks documents by the cosine of their vectors to the query."
)


def bert(tok: Tokenizer) -> tuple[Any, dict[str, Any]]:
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    cfg = transformers.BertConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=MAX_LEN,
        type_vocab_size=2,
        num_labels=1,
        layer_norm_eps=1e-12,
        hidden_act="gelu",
    )
    return transformers.BertForSequenceClassification(cfg), {
        "tokenizer": {
            "cls_token": "[CLS]",
            "sep_token": "[SEP]",
            "pad_token": "[PAD]",
            "unk_token": "[UNK]",
            "mask_token": "[MASK]",
            "model_input_names": ["input_ids", "token_type_ids", "attention_mask"],
        },
        "activation": "legacy-identity",
    }


def xlmr(tok: Tokenizer) -> tuple[Any, dict[str, Any]]:
    tok.post_processor = processors.RobertaProcessing(
        ("</s>", tok.token_to_id("</s>")),
        ("<s>", tok.token_to_id("<s>")),
        trim_offsets=False,
        add_prefix_space=False,
    )
    cfg = transformers.XLMRobertaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=MAX_LEN + 2,
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        layer_norm_eps=1e-5,
        hidden_act="gelu",
        num_labels=1,
    )
    return transformers.XLMRobertaForSequenceClassification(cfg), {
        "tokenizer": {
            "bos_token": "<s>",
            "eos_token": "</s>",
            "cls_token": "<s>",
            "sep_token": "</s>",
            "pad_token": "<pad>",
            "unk_token": "<unk>",
            "mask_token": "<mask>",
        },
        "activation": "saved",
    }


def modernbert(tok: Tokenizer) -> tuple[Any, dict[str, Any]]:
    ids = {t: tok.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]")}
    cfg = transformers.ModernBertConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=MAX_LEN,
        global_attn_every_n_layers=3,
        local_attention=16,
        global_rope_theta=160000.0,
        local_rope_theta=10000.0,
        norm_eps=1e-5,
        hidden_activation="gelu",
        classifier_pooling="mean",
        classifier_activation="gelu",
        num_labels=1,
        pad_token_id=ids["[PAD]"],
        cls_token_id=ids["[CLS]"],
        bos_token_id=ids["[CLS]"],
        sep_token_id=ids["[SEP]"],
        eos_token_id=ids["[SEP]"],
    )
    return transformers.ModernBertForSequenceClassification(cfg), {
        "tokenizer": {
            "cls_token": "[CLS]",
            "sep_token": "[SEP]",
            "pad_token": "[PAD]",
            "unk_token": "[UNK]",
            "mask_token": "[MASK]",
        },
        "activation": "none",
    }


FAMILIES = {
    "bert": ("wordpiece", bert),
    "xlmr": ("unigram", xlmr),
    "modernbert": ("bpe", modernbert),
}


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
    feats = tokenizer(
        [q for q, _ in pairs],
        [d for _, d in pairs],
        padding=True,
        truncation="longest_first",
        max_length=MAX_LEN,
        return_tensors="pt",
    )
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
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=MAX_LEN, **spec["tokenizer"]
    )
    # a copy tokenises for the head, so the saved tokenizer keeps no truncation state
    scratch = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tok.to_str()),
        model_max_length=MAX_LEN,
        **spec["tokenizer"],
    )
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
    logits = ce.predict(pairs, batch_size=len(pairs), activation_fn=identity, convert_to_numpy=True)
    alone = np.array([ce.predict([p], activation_fn=identity)[0] for p in pairs])
    if np.abs(alone - logits).max() > 1e-5:
        raise SystemExit(f"{name}: the reference depends on batch padding: {alone - logits}")
    features = ce.tokenizer(
        [q for q, _ in pairs], [d for _, d in pairs], truncation="longest_first", max_length=MAX_LEN
    )
    long_query = fit_long_query(ce.tokenizer)
    long_docs = [d for d in DOCUMENTS if len(ce.tokenizer(long_query, d)["input_ids"]) > MAX_LEN]
    lq = ce.tokenizer(
        [long_query] * len(long_docs),
        long_docs,
        truncation="only_second",
        max_length=MAX_LEN,
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        long_query_logits = ce.model(**lq).logits[:, 0].numpy()
    np.savez(
        out / name / "golden.npz",
        scores=scores.astype(np.float32),
        logits=logits.astype(np.float32),
        long_query_logits=long_query_logits.astype(np.float32),
    )
    (out / name / "golden.json").write_text(
        json.dumps(
            {
                "queries": QUERIES,
                "documents": DOCUMENTS,
                "long_query": long_query,
                "long_query_documents": long_docs,
                "max_length": MAX_LEN,
                "activation": type(ce.activation_fn).__name__,
                "input_ids": features["input_ids"],
                "token_type_ids": features.get("token_type_ids"),
                "made_by": {
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "sentence_transformers": sentence_transformers.__version__,
                    "script": "scripts/make_reranker_fixtures.py",
                },
            },
            indent=1,
            ensure_ascii=False,
        )
        + "\n"
    )
    size = sum(p.stat().st_size for p in (out / name).rglob("*") if p.is_file())
    print(
        f"{name}: {size / 1024:.0f} KB, activation {type(ce.activation_fn).__name__}, "
        f"pair tokens {[len(i) for i in features['input_ids']]}"
    )


# --- Qwen3-Reranker: yes/no logits of a causal LM --------------------------------------------

#: Qwen3-Reranker's chat template as the sentence-transformers-ready checkpoints ship it
#: (chat_template.jinja): the pair's ``query`` and ``document`` messages (and a ``system``
#: message, CrossEncoder's prompt, as the instruction) rendered into the model card's recipe,
#: prefix ``<|im_start|>system ... <|im_start|>user\n``, ``<Instruct>: .. <Query>: ..
#: <Document>: ..``, suffix ``<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n``
#: (jinja drops the file's last newline).
QWEN3_TEMPLATE = (
    '{%- set instruction = messages | selectattr("role", "eq", "system") | map(attribute="content")'
    ' | first | default("Given a web search query, retrieve relevant passages that answer the '
    'query") -%}\n'
    '{%- set query_text = messages | selectattr("role", "eq", "query") | map(attribute="content")'
    " | first -%}\n"
    '{%- set document_text = messages | selectattr("role", "eq", "document") | '
    'map(attribute="content") | first -%}\n'
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query "
    'and the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n'
    "<|im_start|>user\n<Instruct>: {{ instruction }}\n<Query>: {{ query_text }}\n"
    "<Document>: {{ document_text }}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n\n"
)
QWEN3_MAX_LEN = 128
#: CrossEncoder's ``prompt`` for one query's goldens (the template's ``<Instruct>``).
QWEN3_INSTRUCTION = "Given a code search query, retrieve the code that answers it"
QWEN3_VOCAB = 800
QWEN3_CORPUS = (
    CORPUS
    + (
        "Judge whether the Document meets the requirements based on the Query and the Instruct "
        'provided. Note that the answer can only be "yes" or "no".\n<Instruct>: Given a web search '
        "query, retrieve relevant passages that answer the query\n<Query>: \n<Document>: \n"
        "system\nuser\nassistant\n"
    )
    + "yes\nno\n" * 20
)


def qwen3_tokenizer() -> Any:
    """Qwen's tokenizer as make_decoder_fixtures builds it (NFC, Qwen's split, byte-level BPE,
    Qwen's special tokens), trained with the reranker's template so that ``yes`` and ``no``
    are single tokens (CrossEncoder reads their ids); ``<think>`` / ``</think>`` added as
    Qwen3's tokenizer has them (not special); no post-processor token (apply_chat_template
    adds none)."""
    from tokenizers import AddedToken, Regex, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.train_from_iterator(
        [QWEN3_CORPUS],
        trainers.BpeTrainer(
            vocab_size=QWEN3_VOCAB,
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    vocab = tok.get_vocab()
    merges = [
        tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
        for m in json.loads(tok.to_str())["model"]["merges"]
    ]
    qt = transformers.Qwen2Tokenizer(
        vocab=vocab, merges=merges, padding_side="left", model_max_length=QWEN3_MAX_LEN
    )
    qt.add_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
        ],
        special_tokens=True,
    )
    qt.add_tokens(
        [
            AddedToken("<think>", special=False, normalized=False),
            AddedToken("</think>", special=False, normalized=False),
        ]
    )
    for word in ("yes", "no"):
        if word not in qt.get_vocab():
            raise SystemExit(f"qwen3: {word!r} is not one token of the trained vocabulary")
    return qt


def qwen3_head(model: Any, tok: Any, pairs: list[tuple[str, str]], yes: int, no: int) -> None:
    """``lm_head``'s yes row = its no row + the first principal component of the last
    token's states over ``pairs`` (score std 3): a trained reranker's yes/no logits differ
    along the direction its pairs vary, far beyond int8's rounding (``train_like_head``)."""
    texts = [
        tok.apply_chat_template(
            [{"role": "query", "content": q}, {"role": "document", "content": d}], tokenize=False
        )
        for q, d in pairs
    ]
    feats = tok(
        texts,
        padding=True,
        truncation=True,
        max_length=QWEN3_MAX_LEN,
        return_tensors="pt",
        add_special_tokens=False,
    )
    with torch.no_grad():
        states = model.model(**feats).last_hidden_state[:, -1].double()  # left padding
    centred = states - states.mean(0)
    direction = torch.linalg.svd(centred, full_matrices=False).Vh[0]
    scale = 3.0 / float((centred @ direction).std())
    with torch.no_grad():
        w = model.lm_head.weight
        w[yes] = w[no] + (direction * scale).float()


def tie_lm_head(directory: Path) -> None:
    """The fixture as a tied checkpoint: ``tie_word_embeddings: true`` and no lm_head.weight
    (transformers 5 ties only when lm_head is absent or equal; tests/test_rerank.py makes the
    same copy with safetensors.numpy)."""
    from safetensors.torch import load_file, save_file

    cfg_path = directory / "config.json"
    cfg_json = json.loads(cfg_path.read_text())
    cfg_json["tie_word_embeddings"] = True
    cfg_path.write_text(json.dumps(cfg_json, indent=2) + "\n")
    tensors = load_file(str(directory / "model.safetensors"))
    del tensors["lm_head.weight"]
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


def build_qwen3(out: Path, gen: torch.Generator) -> None:
    """Qwen3-Reranker's layout: a Qwen3ForCausalLM (untied lm_head, as the 8B has it; the
    0.6B/4B tie it to the embeddings, which embedpool reads too) saved by transformers with
    the reranker's chat_template.jinja, loaded by CrossEncoder 6.3 (Transformer
    text-generation + LogitScore(yes, no)) and saved by it. Goldens: CrossEncoder.predict's
    scores (sigmoid of yes - no) and logits (Identity: yes - no), every pair in one padded
    batch; the yes and no logits themselves (transformers, the card's recipe: the last
    token's lm_head row of each); a document longer than the window (CrossEncoder cuts the
    rendered pair's tail and restores the template's suffix: the document's end is cut);
    the first query's logits with CrossEncoder's ``prompt`` (the instruction); every pair's
    logits with ``tie_word_embeddings: true`` (tests flip it in a copy of the fixture)."""
    tok = qwen3_tokenizer()
    tok.chat_template = QWEN3_TEMPLATE
    eid = tok.convert_tokens_to_ids("<|endoftext|>")
    cfg = transformers.Qwen3Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        hidden_act="silu",
        max_position_embeddings=8192,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        attention_bias=False,
        use_sliding_window=False,
        bos_token_id=eid,
        eos_token_id=eid,
        pad_token_id=eid,
    )
    model = transformers.Qwen3ForCausalLM(cfg)
    randomise(model, gen)
    model.eval()
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    pairs = [(q, d) for q in QUERIES for d in DOCUMENTS]
    qwen3_head(model, tok, pairs, yes, no)
    target = out / "qwen3" / "model"
    if target.parent.exists():
        shutil.rmtree(target.parent)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(tmp) / "hf"
        model.save_pretrained(str(hf_dir), safe_serialization=True)
        tok.save_pretrained(str(hf_dir))
        CrossEncoder(str(hf_dir), device="cpu").save(str(target))
    (target / "README.md").unlink(missing_ok=True)
    ce = CrossEncoder(str(target), device="cpu")
    identity = torch.nn.Identity()
    scores = ce.predict(pairs, batch_size=len(pairs), convert_to_numpy=True)
    logits = ce.predict(pairs, batch_size=len(pairs), activation_fn=identity, convert_to_numpy=True)
    alone = np.array([ce.predict([p], activation_fn=identity)[0] for p in pairs])
    if np.abs(alone - logits).max() > 1e-5:
        raise SystemExit(f"qwen3: the reference depends on batch padding: {alone - logits}")
    features = ce[0].preprocess(pairs)
    ids = [
        row[m.bool()].tolist()
        for row, m in zip(features["input_ids"], features["attention_mask"], strict=True)
    ]
    truncated = [len(i) >= QWEN3_MAX_LEN for i in ids]
    if not any(truncated):
        raise SystemExit("qwen3: no pair is longer than the window")
    # the card's recipe on the untruncated pairs: the yes and no logits of the last token
    card = ce.tokenizer.apply_chat_template(
        [[{"role": "query", "content": q}, {"role": "document", "content": d}] for q, d in pairs],
        tokenize=False,
    )
    with torch.no_grad():
        enc = ce.tokenizer(card, padding=True, return_tensors="pt", add_special_tokens=False)
        last = ce.model(**enc).logits[:, -1]
    yes_no = torch.stack([last[:, yes], last[:, no]], 1).numpy()
    full = [not t for t in truncated]
    if np.abs(yes_no[full, 0] - yes_no[full, 1] - logits[full]).max() > 1e-5:
        raise SystemExit("qwen3: CrossEncoder's logits are not yes - no of the card's recipe")
    # CrossEncoder's prompt: rendered as the system message, the template's <Instruct>
    instructed = ce.predict(
        [(QUERIES[0], d) for d in DOCUMENTS],
        prompt=QWEN3_INSTRUCTION,
        activation_fn=identity,
        convert_to_numpy=True,
    )
    # the 0.6B/4B layout: lm_head tied to the token table, so not saved
    with tempfile.TemporaryDirectory() as tmp:
        tied_dir = Path(tmp) / "tied"
        shutil.copytree(target, tied_dir)
        tie_lm_head(tied_dir)
        tied = CrossEncoder(str(tied_dir), device="cpu")
        if not torch.equal(tied.model.lm_head.weight, tied.model.model.embed_tokens.weight):
            raise SystemExit("qwen3: tie_word_embeddings did not tie lm_head")
        tied_logits = tied.predict(
            pairs, batch_size=len(pairs), activation_fn=identity, convert_to_numpy=True
        )
    np.savez(
        out / "qwen3" / "golden.npz",
        scores=scores.astype(np.float32),
        logits=logits.astype(np.float32),
        yes_no=yes_no.astype(np.float32),
        instructed_logits=instructed.astype(np.float32),
        tied_logits=tied_logits.astype(np.float32),
    )
    (out / "qwen3" / "golden.json").write_text(
        json.dumps(
            {
                "queries": QUERIES,
                "documents": DOCUMENTS,
                "max_length": QWEN3_MAX_LEN,
                "activation": type(ce.activation_fn).__name__,
                "yes_id": yes,
                "no_id": no,
                "input_ids": ids,
                "truncated": truncated,
                "instruction": QWEN3_INSTRUCTION,
                "made_by": {
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "sentence_transformers": sentence_transformers.__version__,
                    "script": "scripts/make_reranker_fixtures.py",
                },
            },
            indent=1,
            ensure_ascii=False,
        )
        + "\n"
    )
    size = sum(p.stat().st_size for p in (out / "qwen3").rglob("*") if p.is_file())
    print(
        f"qwen3: {size / 1024:.0f} KB, activation {type(ce.activation_fn).__name__}, "
        f"pair tokens {[len(i) for i in ids]}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("tests/fixtures/rerankers"))
    ap.add_argument("--families", default=",".join([*FAMILIES, "qwen3"]))
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    for name in args.families.split(","):
        if name == "qwen3":  # its own seed: the same fixture whatever else is built
            torch.manual_seed(SEED)
            build_qwen3(args.out, torch.Generator().manual_seed(SEED))
        else:
            build(name, args.out, gen)


if __name__ == "__main__":
    main()
