"""Dev-only: small random-weight decoder embedders (Qwen3, Qwen2, ...) in sentence-transformers
6's layout, with golden vectors from transformers + sentence-transformers, for tests that
run without torch.

    /work/devenv/bin/python scripts/make_decoder_fixtures.py [--only qwen3] [--out DIR]

Follows scripts/make_family_fixtures.py (whose texts, corpus, weight randomisation and long
text it reuses): each family is one builder function in ``DECODERS`` returning the
transformers model, its tokenizer and the sentence-transformers spec; ``build`` saves and
checks it the same way for every family. (Another family, e.g. gemma3, adds its own
builder function to ``DECODERS``.)

- ``qwen3``: Qwen3 as Qwen3-Embedding has it: per-head q/k RMSNorm, rotary positions (theta
  1e6), grouped-query attention (4 q heads, 2 kv heads) with ``head_dim`` 16 apart from
  hidden / heads (32 / 4), SwiGLU, tied embeddings, causal attention; a byte-level BPE
  tokenizer built the way transformers 5's ``Qwen2Tokenizer`` builds Qwen's (NFC, Qwen's
  split regex, byte level) whose tokenizer.json post-processor appends ``<|endoftext|>``
  (as Qwen3-Embedding's does), ``padding_side`` left (as Qwen3-Embedding's
  tokenizer_config.json says); last-token pooling, Normalize, the card's query prompt.
- ``qwen2``: Qwen2 (jina-code-embeddings, gte-Qwen2): q/k/v biases, no q/k norm, 4 q heads and
  1 kv head (MQA), untied embeddings, a tokenizer that appends no EOS (the pooled token is
  the text's own last one), right padding.

Each is written under ``<out>/<name>/``: ``model/`` (sentence-transformers 6's save: modules
.json, 1_Pooling with ``pooling_mode: lasttoken``, 2_Normalize, config_sentence_transformers
.json with prompts), ``golden.json`` (texts, the reference's token ids, versions),
``golden.npz`` (``vectors``: the texts in one padded batch by ``SentenceTransformer.encode``;
``query_vectors``: with ``prompt_name="query"``; ``dim_vectors``: ``truncate_dim=DIM``;
``bidirectional_vectors``: the same model with ``is_causal: false`` in config.json, as a
gte-Qwen2-like directory says its bidirectional attention),
``long.json`` / ``long.npz``: one text of 7,680-8,192 tokens, its ids and vector. The script
checks that the reference is batch-independent (each text alone, padded either side, gives
the same vector) before writing anything.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import sentence_transformers
import torch
import transformers
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Normalize, Transformer
from sentence_transformers.sentence_transformer.modules import Pooling
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

sys.path.insert(0, str(Path(__file__).parent))
from make_family_fixtures import CORPUS, TEXTS, long_text, randomise, unpadded_ids

SEED = 20261207
#: Matryoshka width the goldens are also computed at (``truncate_dim``).
DIM = 16
LONG_MAX = 8192
#: Qwen2/Qwen3's pre-tokenizer split (transformers' tokenization_qwen2.PRETOKENIZE_REGEX).
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
    r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CODE_QUERY = "Instruct: Given a code search query, retrieve relevant code\nQuery:"


def qwen_tokenizer(*, eos: bool, padding_side: str) -> transformers.PreTrainedTokenizerBase:
    """A small byte-level BPE trained on CORPUS, as transformers 5's Qwen2Tokenizer builds
    Qwen's (NFC, Qwen's split, byte level), with Qwen's special tokens; ``eos``: its
    post-processor appends ``<|endoftext|>`` (Qwen3-Embedding's tokenizer.json)."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.train_from_iterator(
        [CORPUS],
        trainers.BpeTrainer(
            vocab_size=500,
            special_tokens=QWEN_SPECIAL,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    vocab = tok.get_vocab()
    merges = [
        tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
        for m in json.loads(tok.to_str())["model"]["merges"]
    ]
    qt = transformers.Qwen2Tokenizer(
        vocab=vocab, merges=merges, padding_side=padding_side, model_max_length=LONG_MAX
    )
    if eos:
        eid = qt.convert_tokens_to_ids("<|endoftext|>")
        qt._tokenizer.post_processor = processors.TemplateProcessing(
            single="$A:0 <|endoftext|>:0",
            pair="$A:0 <|endoftext|>:0 $B:1 <|endoftext|>:1",
            special_tokens=[("<|endoftext|>", eid)],
        )
    return qt


# --- the families (one builder each) ---------------------------------------------------------


def qwen3() -> tuple[Any, Any, dict[str, Any]]:
    tok = qwen_tokenizer(eos=True, padding_side="left")
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
        max_position_embeddings=LONG_MAX,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        attention_bias=False,
        use_sliding_window=False,
        bos_token_id=eid,
        eos_token_id=eid,
        pad_token_id=eid,
    )
    return (
        transformers.Qwen3Model(cfg),
        tok,
        {
            "prompts": {"query": CODE_QUERY, "document": ""},
            "pooling": "lasttoken",
            "bidirectional": True,
        },
    )


def qwen2() -> tuple[Any, Any, dict[str, Any]]:
    tok = qwen_tokenizer(eos=False, padding_side="right")
    eid = tok.convert_tokens_to_ids("<|endoftext|>")
    cfg = transformers.Qwen2Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        hidden_act="silu",
        max_position_embeddings=LONG_MAX,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        use_sliding_window=False,
        bos_token_id=eid,
        eos_token_id=eid,
        pad_token_id=eid,
    )
    return (
        transformers.Qwen2Model(cfg),
        tok,
        {
            "prompts": {
                "query": "Find the most relevant code snippet given the following query:\n",
                "passage": "Candidate code snippet:\n",
            },
            "pooling": "lasttoken",
            "bidirectional": True,
        },
    )


DECODERS: dict[str, Callable[[], tuple[Any, Any, dict[str, Any]]]] = {
    "qwen3": qwen3,
    "qwen2": qwen2,
}


# --- building one fixture --------------------------------------------------------------------


def _encode(st: SentenceTransformer, texts: list[str], **kw: Any) -> np.ndarray:
    return np.asarray(
        st.encode(texts, batch_size=len(texts), convert_to_numpy=True, **kw), dtype=np.float32
    )


def build(name: str, out: Path, gen: torch.Generator) -> None:
    model, tok, spec = DECODERS[name]()
    randomise(model, gen)
    model.eval()
    width = model.config.hidden_size
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(tmp) / "hf"
        model.save_pretrained(str(hf_dir), safe_serialization=True)
        tok.save_pretrained(str(hf_dir))
        st = SentenceTransformer(
            modules=[
                Transformer(str(hf_dir), max_seq_length=LONG_MAX),
                Pooling(width, pooling_mode=spec["pooling"]),
                Normalize(),
            ],
            prompts=spec["prompts"],
            device="cpu",
        )
        target = out / name / "model"
        if target.parent.exists():
            shutil.rmtree(target.parent)
        st.save(str(target))
    (target / "README.md").unlink(missing_ok=True)
    st = SentenceTransformer(str(target), device="cpu")  # what a user would load
    vectors = _encode(st, TEXTS)
    query = _encode(st, TEXTS, prompt_name="query")
    dims = _encode(st, TEXTS, truncate_dim=DIM)
    alone = np.concatenate([_encode(st, [t]) for t in TEXTS])
    side = st.tokenizer.padding_side
    st.tokenizer.padding_side = "right" if side == "left" else "left"
    flipped = _encode(st, TEXTS)
    st.tokenizer.padding_side = side
    for what, other in (("alone", alone), ("padded on the other side", flipped)):
        cos = (vectors * other).sum(1)
        if cos.min() < 0.99999:
            raise SystemExit(f"{name}: the reference differs {what}: {cos}")
    features = st.tokenize(TEXTS)
    input_ids = unpadded_ids(features)
    text = long_text(lambda t: len(st.tokenizer(t)["input_ids"]))
    long_ids = st.tokenize([text])["input_ids"][0].numpy()
    long_vec = _encode(st, [text])[0]
    extra: dict[str, np.ndarray] = {}
    if spec.get("bidirectional"):  # the same weights with transformers' is_causal: false
        with tempfile.TemporaryDirectory() as tmp:
            bidir = Path(tmp) / "bidir"
            shutil.copytree(target, bidir)
            cfg = json.loads((bidir / "config.json").read_text())
            (bidir / "config.json").write_text(json.dumps({**cfg, "is_causal": False}))
            extra["bidirectional_vectors"] = _encode(
                SentenceTransformer(str(bidir), device="cpu"), TEXTS
            )
        if (extra["bidirectional_vectors"] * vectors).sum(1)[1:].max() > 0.999:
            raise SystemExit(f"{name}: is_causal false changes nothing")
    made_by = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "script": "scripts/make_decoder_fixtures.py",
    }
    np.savez(
        out / name / "golden.npz", vectors=vectors, query_vectors=query, dim_vectors=dims, **extra
    )
    (out / name / "golden.json").write_text(
        json.dumps(
            {
                "texts": TEXTS,
                "input_ids": input_ids,
                "prompt_name": "query",
                "dim": DIM,
                "made_by": made_by,
            },
            indent=1,
            ensure_ascii=False,
        )
        + "\n"
    )
    np.savez(out / name / "long.npz", input_ids=long_ids.astype(np.int32), vector=long_vec)
    (out / name / "long.json").write_text(
        json.dumps(
            {
                "text": text,
                "max_seq_length": LONG_MAX,
                "tokens": int(long_ids.size),
                "made_by": made_by,
            },
            indent=1,
            ensure_ascii=False,
        )
        + "\n"
    )
    size = sum(p.stat().st_size for p in (out / name).rglob("*") if p.is_file())
    print(
        f"{name}: {size / 1024:.0f} KB, dim {vectors.shape[1]}, tokens "
        f"{[len(i) for i in input_ids]}, long {long_ids.size}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("tests/fixtures/families"))
    ap.add_argument("--only", choices=sorted(DECODERS), action="append")
    args = ap.parse_args()
    torch.manual_seed(SEED)
    for i, name in enumerate(DECODERS):
        if not args.only or name in args.only:
            build(name, args.out, torch.Generator().manual_seed(SEED + i))


if __name__ == "__main__":
    main()
