"""Dev-only: small random-weight models of the encoder families embedpool builds besides BERT,
with golden vectors from the reference implementations, for tests that run without torch.

    /work/devenv/bin/python scripts/make_family_fixtures.py [--out tests/fixtures/families]

Needs torch, transformers and sentence-transformers (the dev venv); embedpool and CI never
do. Each family keeps the features that make it what it is, at a size that keeps each
fixture a few hundred KB:

- ``xlmr``: XLM-RoBERTa, positions from ``padding_idx + 1`` that skip pad tokens, a 1-row
  token-type table, a SentencePiece (Unigram, Metaspace) tokenizer with ``<s> ... </s>``.
- ``nomic``: NomicBert, rotary positions (base 1000, half-split), SwiGLU, no biases, saved in
  the layout nomic-ai's hub checkpoints use (``n_embd``, ``encoder.layers.N.attn.Wqkv``).
- ``modernbert``: ModernBERT, pre-norm, embedding and final norms, GeGLU, no biases, global
  (rope theta 160000) and local (theta 10000, a 16-token window) attention layers, CLS
  pooling. The local window is smaller than most test texts.

Each is saved in sentence-transformers' layout as the hub's models have it (modules.json,
sentence_bert_config.json, 1_Pooling with the ``pooling_mode_*`` flags, 2_Normalize,
config_sentence_transformers.json with prompts) under
``<out>/<name>/model/``, next to ``golden.json`` (the texts, the token ids the reference
tokenizer gives, versions) and ``golden.npz`` (``vectors``: the texts embedded in one padded
batch by ``SentenceTransformer.encode``; ``query_vectors``: the same with
``prompt_name="query"``). The script checks that the reference itself is batch-independent
(each text alone gives the same vector) before writing anything.

``--long`` adds, for the long-context families (nomic, modernbert), ``long.json`` and
``long.npz``: one text of 7,680-8,192 tokens (30 x MiniLM's window) embedded by the
reference with the committed model at max length 8,192 (positions raised to match).

The tokenizers' training is not bit-reproducible across runs (ties in pair counts), so a
rerun writes slightly different fixtures: the committed files are the reference.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import sentence_transformers
import torch
import transformers
from safetensors.torch import load_file, save_file
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Normalize, Transformer
from sentence_transformers.sentence_transformer.modules import Pooling
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import PreTrainedTokenizerFast

SEED = 20240611

#: What the tokenizers learn their small vocabularies from: prose, code, and a little of
#: other scripts, so that the test texts split into real pieces and a few unknowns.
CORPUS = (
    """
The quick brown fox jumps over the lazy dog. A search engine ranks documents by relevance.
Embeddings map each text to a vector; similar texts get nearby vectors.
def add(a, b):
    return a + b
class Cache(dict):
    def __missing__(self, key):
        value = self[key] = compute(key)
        return value
for i in range(10):
    print(i, "items processed")
import numpy as np
result = np.dot(query, document) / (norm(query) * norm(document))
Ceci est une phrase en français sur la recherche de documents.
Dies ist ein deutscher Satz über Vektoren und Suche.
Esta es una frase en español sobre el aprendizaje automático.
The model reads long documents in windows and pools the token states.
Returns the number of tokens in the text, counting special tokens.
raise ValueError("bad input: expected a list of strings")
with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
"""
    * 3
)

#: Embedded in one padded batch: short texts padded next to long ones, texts longer than the
#: ModernBERT fixture's 16-token local window, other scripts, a literal pad token (XLM-R's
#: positions skip it), and one text longer than every fixture's max length (truncated).
TEXTS = [
    "x",
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.",
    "Ceci est une phrase en français.",
    "class Cache(dict):\n    def __missing__(self, key):\n        value = self[key] = "
    "compute(key)\n        return value\n",
    "Embeddings map each text to a vector; similar texts get nearby vectors, and a search "
    "engine ranks documents by the cosine of their vectors to the query vector.",
    "a <pad> token and a [PAD] token inside the text",
    "日本語のテキストと emoji 🙂 mixed with English words",
    "for i in range(10):\n    print(i, 'items processed')\n" * 12,
]


def train_tokenizer(kind: str) -> Tokenizer:
    """A small tokenizer of the family's own kind, trained on CORPUS."""
    if kind == "unigram":  # XLM-R: SentencePiece Unigram with Metaspace
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        tok.train_from_iterator(
            [CORPUS],
            trainers.UnigramTrainer(
                vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>"], unk_token="<unk>"
            ),
        )
        tok.add_special_tokens(["<mask>"])
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>",
            pair="<s> $A </s> </s> $B </s>",
            special_tokens=[("<s>", 0), ("</s>", 2)],
        )
    elif kind == "wordpiece":  # BERT-style, lower-cased (nomic uses bert-base-uncased's)
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        tok.train_from_iterator(
            [CORPUS],
            trainers.WordPieceTrainer(
                vocab_size=400, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
            ),
        )
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
        )
    else:  # ModernBERT: byte-level BPE (OLMo/NeoX style) with [CLS] ... [SEP]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(
            [CORPUS],
            trainers.BpeTrainer(
                vocab_size=500,
                special_tokens=["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"],
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            ),
        )
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )
    return tok


def randomise(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Weights far from HF's 0.02-std init, so that texts get distinct vectors and a wrong
    position, window or mask shows as a wrong vector: matrices Laplace with std 0.2,
    embeddings N(0, 0.5), norm scales 1 + N(0, 0.1), biases N(0, 0.1).

    Laplace, not normal: trained weights have heavy tails, so most of a column sits far below
    its largest value. Normal weights over a fan-in of 32 do not, and then ONNX Runtime's
    AVX2 u8 x s8 kernel saturates its int16 pair sums far more often than with any real
    model (the int8 tests would measure that artefact, not the family)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name.lower():
                p.copy_(1 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif "embeddings" in name:
                p.copy_(0.5 * noise)
            else:  # Laplace, std 0.2: heavier tails, as trained weights have
                u = torch.rand(p.shape, generator=gen) - 0.5
                p.copy_(-0.2 / 2**0.5 * torch.sign(u) * torch.log1p(-2 * u.abs()))


# --- the families --------------------------------------------------------------------------


def xlmr(tok: Tokenizer) -> tuple[transformers.PreTrainedModel, dict[str, Any]]:
    cfg = transformers.XLMRobertaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=66,
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        layer_norm_eps=1e-5,
        hidden_act="gelu",
    )
    return transformers.XLMRobertaModel(cfg, add_pooling_layer=False), {
        "max_seq_length": 64,
        "pooling": "mean",
        "prompts": {"query": "query: ", "passage": "passage: "},
        "tokenizer": {
            "bos_token": "<s>",
            "eos_token": "</s>",
            "cls_token": "<s>",
            "sep_token": "</s>",
            "pad_token": "<pad>",
            "unk_token": "<unk>",
            "mask_token": "<mask>",
        },
    }


def nomic(tok: Tokenizer) -> tuple[transformers.PreTrainedModel, dict[str, Any]]:
    cfg = transformers.NomicBertConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=128,
        type_vocab_size=2,
        pad_token_id=0,
        layer_norm_eps=1e-12,
        hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
    )
    return transformers.NomicBertModel(cfg), {
        "max_seq_length": 128,
        "pooling": "mean",
        "prompts": {"query": "search_query: ", "document": "search_document: "},
        "tokenizer": {
            "cls_token": "[CLS]",
            "sep_token": "[SEP]",
            "pad_token": "[PAD]",
            "unk_token": "[UNK]",
            "mask_token": "[MASK]",
        },
    }


def modernbert(tok: Tokenizer) -> tuple[transformers.PreTrainedModel, dict[str, Any]]:
    ids = {t: tok.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]")}
    cfg = transformers.ModernBertConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=128,
        global_attn_every_n_layers=3,
        local_attention=16,
        global_rope_theta=160000.0,
        local_rope_theta=10000.0,
        norm_eps=1e-5,
        hidden_activation="gelu",
        pad_token_id=ids["[PAD]"],
        cls_token_id=ids["[CLS]"],
        bos_token_id=ids["[CLS]"],
        sep_token_id=ids["[SEP]"],
        eos_token_id=ids["[SEP]"],
    )
    assert cfg.layer_types == [
        "full_attention",
        "sliding_attention",
        "sliding_attention",
        "full_attention",
    ], cfg.layer_types
    return transformers.ModernBertModel(cfg), {
        "max_seq_length": 128,
        "pooling": "cls",
        "prompts": {"query": "search_query: ", "document": "search_document: "},
        "tokenizer": {
            "cls_token": "[CLS]",
            "sep_token": "[SEP]",
            "pad_token": "[PAD]",
            "unk_token": "[UNK]",
            "mask_token": "[MASK]",
        },
    }


FAMILIES: dict[str, tuple[str, Callable[[Tokenizer], tuple[Any, dict[str, Any]]]]] = {
    "xlmr": ("unigram", xlmr),
    "nomic": ("wordpiece", nomic),
    "modernbert": ("bpe", modernbert),
}


# --- nomic-ai's hub layout -------------------------------------------------------------------


def to_nomic_hub_layout(model_dir: Path) -> None:
    """Rewrite a transformers-native NomicBert save as nomic-ai's own checkpoints are laid
    out (their ``trust_remote_code`` config keys and weight names), the layout of every
    NomicBert on the hub. transformers maps it back with its ``conversion_mapping``; the
    script checks that it does before the fixture is used."""
    cfg = json.loads((model_dir / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    hub = {
        "architectures": ["NomicBertModel"],
        "model_type": "nomic_bert",
        "activation_function": "swiglu",
        "n_embd": cfg["hidden_size"],
        "n_head": heads,
        "n_layer": cfg["num_hidden_layers"],
        "n_inner": cfg["intermediate_size"],
        "n_positions": cfg["max_position_embeddings"],
        "max_trained_positions": 2048,
        "layer_norm_epsilon": cfg["layer_norm_eps"],
        "vocab_size": cfg["vocab_size"],
        "type_vocab_size": cfg["type_vocab_size"],
        "pad_token_id": cfg["pad_token_id"],
        "rotary_emb_base": cfg["rope_parameters"]["rope_theta"],
        "rotary_emb_fraction": 1.0,
        "rotary_emb_interleaved": False,
        "rotary_emb_scale_base": None,
        "rotary_scaling_factor": None,
        "qkv_proj_bias": False,
        "mlp_fc1_bias": False,
        "mlp_fc2_bias": False,
        "prenorm": False,
        "parallel_block": False,
        "parallel_block_tied_norm": False,
        "use_rms_norm": False,
        "causal": False,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "attn_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "resid_pdrop": 0.0,
        "summary_activation": None,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
    }
    (model_dir / "config.json").write_text(json.dumps(hub, indent=2) + "\n")
    native = load_file(str(model_dir / "model.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for key, value in native.items():
        if key.startswith("layers."):
            _, i, rest = key.split(".", 2)
            p = f"encoder.layers.{i}."
            if rest.startswith("self_attn.q_proj"):
                qkv = [native[f"layers.{i}.self_attn.{n}_proj.weight"] for n in "qkv"]
                out[p + "attn.Wqkv.weight"] = torch.cat(qkv, dim=0)
                continue
            if rest.startswith(("self_attn.k_proj", "self_attn.v_proj")):
                continue
            rest = (
                rest.replace("self_attn.o_proj", "attn.out_proj")
                .replace("mlp.up_proj", "mlp.fc11")
                .replace("mlp.gate_proj", "mlp.fc12")
                .replace("mlp.down_proj", "mlp.fc2")
                .replace("post_attention_layernorm", "norm1")
                .replace("post_mlp_layernorm", "norm2")
            )
            out[p + rest] = value
        else:
            out[key.replace("embeddings.LayerNorm", "emb_ln")] = value
    save_file(out, str(model_dir / "model.safetensors"), metadata={"format": "pt"})


def check_nomic_hub_layout(
    model_dir: Path, native: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor
) -> None:
    """transformers' own conversion of the hub layout gives the native model back."""
    cfg = native.config
    loaded = transformers.NomicBertModel.from_pretrained(str(model_dir), config=cfg)
    loaded.eval()
    with torch.no_grad():
        a = native(input_ids=ids, attention_mask=mask).last_hidden_state
        b = loaded(input_ids=ids, attention_mask=mask).last_hidden_state
    if not torch.equal(a, b):
        raise SystemExit("nomic hub layout does not load back into transformers' model")


def to_legacy_st_layout(target: Path, spec: dict[str, Any], width: int) -> None:
    """sentence-transformers 6 saves ``{"pooling_mode": ...}`` and leaves max_seq_length to the
    tokenizer; rewrite the files in the layout of the models on the hub (2.x-5.x, still read
    by 6.x): module types under ``sentence_transformers.models``, the pooling flags, and
    ``max_seq_length`` in sentence_bert_config.json. The model card is dropped (size)."""
    (target / "README.md").unlink(missing_ok=True)
    modules = json.loads((target / "modules.json").read_text())
    for m in modules:
        m["type"] = "sentence_transformers.models." + m["type"].rsplit(".", 1)[1]
    (target / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
    on = {"cls": "cls_token", "mean": "mean_tokens"}[spec["pooling"]]
    flags = {
        f"pooling_mode_{m}": m == on
        for m in (
            "cls_token",
            "mean_tokens",
            "max_tokens",
            "mean_sqrt_len_tokens",
            "weightedmean_tokens",
            "lasttoken",
        )
    }
    (target / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": width, **flags, "include_prompt": True}, indent=2)
        + "\n"
    )
    (target / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": spec["max_seq_length"], "do_lower_case": False}, indent=2)
        + "\n"
    )


# --- building one fixture --------------------------------------------------------------------


def unpadded_ids(features: dict[str, Any]) -> list[list[int]]:
    """Each text's token ids from a padded ``tokenize`` batch (the attention mask's tokens)."""
    return [
        row[m.bool()].tolist()
        for row, m in zip(features["input_ids"], features["attention_mask"], strict=True)
    ]


def build(name: str, out: Path, gen: torch.Generator) -> None:
    kind, make = FAMILIES[name]
    tok = train_tokenizer(kind)
    model, spec = make(tok)
    randomise(model, gen)
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(tmp) / "hf"
        model.save_pretrained(str(hf_dir), safe_serialization=True)
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, model_max_length=spec["max_seq_length"], **spec["tokenizer"]
        )
        fast.save_pretrained(str(hf_dir))
        st = SentenceTransformer(
            modules=[
                Transformer(str(hf_dir), max_seq_length=spec["max_seq_length"]),
                Pooling(model.config.hidden_size, pooling_mode=spec["pooling"]),
                Normalize(),
            ],
            prompts=spec["prompts"],
            device="cpu",
        )
        target = out / name / "model"
        if target.parent.exists():
            shutil.rmtree(target.parent)
        st.save(str(target))
    to_legacy_st_layout(target, spec, model.config.hidden_size)
    st = SentenceTransformer(str(target), device="cpu")  # what a user would load
    if st.max_seq_length != spec["max_seq_length"]:
        raise SystemExit(f"{name}: reloaded max_seq_length {st.max_seq_length}")
    vectors = st.encode(TEXTS, batch_size=len(TEXTS), convert_to_numpy=True)
    query = st.encode(TEXTS, batch_size=len(TEXTS), prompt_name="query", convert_to_numpy=True)
    alone = np.concatenate([st.encode([t], convert_to_numpy=True) for t in TEXTS])
    cos = (vectors * alone).sum(1)
    if cos.min() < 0.99999:
        raise SystemExit(f"{name}: the reference depends on batch padding: {cos}")
    features = st.tokenize(TEXTS)
    input_ids = unpadded_ids(features)
    if name == "nomic":
        to_nomic_hub_layout(target)
        check_nomic_hub_layout(target, model, features["input_ids"], features["attention_mask"])
    np.savez(
        out / name / "golden.npz",
        vectors=vectors.astype(np.float32),
        query_vectors=query.astype(np.float32),
    )
    (out / name / "golden.json").write_text(
        json.dumps(
            {
                "texts": TEXTS,
                "input_ids": input_ids,
                "prompt_name": "query",
                "made_by": {
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "sentence_transformers": sentence_transformers.__version__,
                    "script": "scripts/make_family_fixtures.py",
                },
            },
            indent=1,
            ensure_ascii=False,
        )
        + "\n"
    )
    size = sum(p.stat().st_size for p in (out / name).rglob("*") if p.is_file())
    print(
        f"{name}: {size / 1024:.0f} KB, dim {vectors.shape[1]}, "
        f"tokens {[len(i) for i in input_ids]}"
    )


# --- long context ------------------------------------------------------------------------------

#: The long-context families and the config key that bounds their positions.
LONG: dict[str, str] = {"nomic": "max_position_embeddings", "modernbert": "max_position_embeddings"}
LONG_MAX = 8192
#: The long text's token count: at least 30 x MiniLM's 256-token window, and not truncated.
LONG_TOKENS = (30 * 256, LONG_MAX)


def long_model_dir(name: str, fixture: Path, dst: Path) -> Path:
    """The committed fixture with max_seq_length and positions raised to LONG_MAX (what the
    tests do with their copy). NomicBert gets transformers' native config, since
    sentence-transformers loads nomic-ai's hub config only with trust_remote_code; the hub
    weights load through transformers' conversion mapping (checked: the short goldens)."""
    shutil.copytree(fixture / "model", dst)
    cfg = json.loads((dst / "config.json").read_text())
    if name == "nomic":
        cfg = {
            "model_type": "nomic_bert",
            "hidden_size": cfg["n_embd"],
            "num_attention_heads": cfg["n_head"],
            "num_hidden_layers": cfg["n_layer"],
            "intermediate_size": cfg["n_inner"],
            "layer_norm_eps": cfg["layer_norm_epsilon"],
            "hidden_act": "silu",
            "vocab_size": cfg["vocab_size"],
            "type_vocab_size": cfg["type_vocab_size"],
            "pad_token_id": cfg["pad_token_id"],
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg["rotary_emb_base"]},
        }
    cfg[LONG[name]] = LONG_MAX
    (dst / "config.json").write_text(json.dumps(cfg))
    st_cfg = json.loads((dst / "sentence_bert_config.json").read_text())
    (dst / "sentence_bert_config.json").write_text(
        json.dumps({**st_cfg, "max_seq_length": LONG_MAX})
    )
    return dst


def long_text(count: Callable[[str], int]) -> str:
    """The fixture's texts (code, prose, other scripts, a literal pad token) repeated until
    the text has LONG_TOKENS tokens."""
    unit = "\n".join(TEXTS[1:]) + "\n"
    lo, hi = 1, 400
    while lo < hi:  # the fewest repetitions that reach LONG_TOKENS[0]
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if count(unit * mid) < LONG_TOKENS[0] else (lo, mid)
    text = unit * lo
    while count(text) > LONG_TOKENS[1]:
        text = text[: int(len(text) * 0.99)]
    if not LONG_TOKENS[0] <= count(text) <= LONG_TOKENS[1]:
        raise SystemExit(f"no text of {LONG_TOKENS} tokens: {count(text)}")
    return text


def build_long(name: str, out: Path) -> None:
    """``long.json`` (the text, its max length) and ``long.npz`` (``input_ids``, ``vector``)
    next to the committed fixture: one text of LONG_TOKENS tokens embedded by the reference
    at max length LONG_MAX."""
    fixture = out / name
    with tempfile.TemporaryDirectory() as tmp:
        st = SentenceTransformer(str(long_model_dir(name, fixture, Path(tmp) / "m")), device="cpu")
        if st.max_seq_length != LONG_MAX:
            raise SystemExit(f"{name}: max_seq_length {st.max_seq_length}")
        gold = json.loads((fixture / "golden.json").read_text())
        short = st.encode(gold["texts"][:-1], convert_to_numpy=True)
        cos = (short * np.load(fixture / "golden.npz")["vectors"][:-1]).sum(1)
        if cos.min() < 0.99999:
            raise SystemExit(f"{name}: the long-context copy is not the fixture's model: {cos}")
        text = long_text(lambda t: len(st.tokenizer(t)["input_ids"]))
        ids = st.tokenize([text])["input_ids"][0].numpy()
        vector = st.encode([text], convert_to_numpy=True)[0]
    np.savez(fixture / "long.npz", input_ids=ids.astype(np.int32), vector=vector.astype(np.float32))
    (fixture / "long.json").write_text(
        json.dumps(
            {
                "text": text,
                "max_seq_length": LONG_MAX,
                "tokens": int(ids.size),
                "made_by": {
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "sentence_transformers": sentence_transformers.__version__,
                    "script": "scripts/make_family_fixtures.py --long",
                },
            },
            indent=1,
            ensure_ascii=False,
        )
        + "\n"
    )
    print(f"{name}: long text of {ids.size} tokens")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("tests/fixtures/families"))
    ap.add_argument("--only", choices=sorted(FAMILIES), action="append")
    ap.add_argument(
        "--long",
        action="store_true",
        help="only the long-context goldens, from the committed fixtures",
    )
    args = ap.parse_args()
    torch.manual_seed(SEED)
    for i, name in enumerate(FAMILIES):
        if args.only and name not in args.only:
            continue
        if args.long:
            if name in LONG:
                build_long(name, args.out)
            continue
        build(name, args.out, torch.Generator().manual_seed(SEED + i))


if __name__ == "__main__":
    main()
