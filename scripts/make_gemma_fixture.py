"""Dev-only: a small random-weight EmbeddingGemma-like model (``gemma3_text``) with golden
vectors from transformers + sentence-transformers, for tests that run without torch.

    /work/devenv/bin/python scripts/make_gemma_fixture.py [--out tests/fixtures/families]

Needs torch, transformers and sentence-transformers (the dev venv); embedpool and CI never
do. The model keeps what makes EmbeddingGemma-300m what it is, at a size that keeps the
fixture a few hundred KB:

- ``Gemma3TextModel`` with ``use_bidirectional_attention``: sliding (local) and global layers
  (``layer_types``), a small ``sliding_window`` (16: keys within 8 positions, as transformers
  halves a bidirectional window) so that most test texts are longer than the window, rotary
  bases 1e6 (global) and 1e4 (local), q/k RMSNorm, four norms per layer, GeGLU with
  ``gelu_pytorch_tanh``, embeddings scaled by sqrt(hidden).
- Multi-query attention (one key/value head for two query heads) and ``head_dim`` apart from
  ``hidden / heads`` (24, against 32 / 2), and ``query_pre_attn_scalar`` apart from
  ``head_dim`` (so the score scale is tested, not assumed).
- sentence-transformers 6's own save (modules.json, 1_Pooling ``mean``, 2_Dense 32 -> 128 and
  3_Dense 128 -> 32 without bias or activation, 4_Normalize) with EmbeddingGemma's prompts
  (its model card's config_sentence_transformers.json).
- A small BPE tokenizer in Gemma's style (SentencePiece-like ``▁`` spaces, byte fallback,
  ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3) whose template wraps each text in
  ``<bos> ... <eos>``, as EmbeddingGemma's tokenizer does.

Written under ``<out>/gemma3/``: ``model/``, ``golden.json`` (texts, the reference tokenizer's
ids, versions), ``golden.npz`` (``vectors``: the texts in one padded batch;
``query_vectors``: the same with ``prompt_name="query"``), and ``long.json`` / ``long.npz``:
one text of 4,096-4,608 tokens embedded by the reference with the model's positions and
max length raised to 8,192 (the tests raise them the same way in their copy).

The reference is checked to be batch-independent (each text alone gives its batch vector)
before anything is written. A rerun writes slightly different files (the tokenizer's
training breaks ties differently): the committed files are the reference.
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
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import Dense, Normalize, Transformer
from sentence_transformers.sentence_transformer.modules import Pooling
from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
from transformers import PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).parent))
from make_family_fixtures import CORPUS, TEXTS, unpadded_ids

SEED = 20261207
NAME = "gemma3"
MAX_SEQ = 128
LONG_MAX = 8192
#: The long text's token count: at least 4,096 (issue 18), not truncated.
LONG_TOKENS = (4096, 4608)

#: EmbeddingGemma-300m's prompts, as its config_sentence_transformers.json has them.
PROMPTS = {
    "query": "task: search result | query: ",
    "document": "title: none | text: ",
    "BitextMining": "task: search result | query: ",
    "Clustering": "task: clustering | query: ",
    "Classification": "task: classification | query: ",
    "InstructionRetrieval": "task: code retrieval | query: ",
    "MultilabelClassification": "task: classification | query: ",
    "PairClassification": "task: sentence similarity | query: ",
    "Reranking": "task: search result | query: ",
    "Retrieval": "task: search result | query: ",
    "Retrieval-query": "task: search result | query: ",
    "Retrieval-document": "title: none | text: ",
    "STS": "task: sentence similarity | query: ",
    "Summarization": "task: summarization | query: ",
}
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]


def gemma_tokenizer() -> Tokenizer:
    """BPE over ``▁``-joined words with byte fallback, trained on CORPUS; the 256 byte tokens
    follow the learned vocabulary, as in Gemma's (which has them among its first ids)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.train_from_iterator([CORPUS], trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIALS))
    vocab = dict(tok.get_vocab())
    merges = json.loads(tok.to_str())["model"]["merges"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    out = Tokenizer(
        models.BPE(
            vocab,
            [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges],
            unk_token="<unk>",
            byte_fallback=True,
            fuse_unk=True,
        )
    )
    out.add_special_tokens(SPECIALS)
    out.normalizer = normalizers.Replace(" ", "▁")
    out.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    out.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>",
        pair="<bos> $A <eos> $B <eos>",
        special_tokens=[("<bos>", 2), ("<eos>", 1)],
    )
    assert [out.token_to_id(t) for t in SPECIALS] == [0, 1, 2, 3]
    return out


def gemma_config(vocab_size: int, **changes: Any) -> transformers.Gemma3TextConfig:
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=24,
        query_pre_attn_scalar=20,
        max_position_embeddings=MAX_SEQ,
        rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh",
        sliding_window=16,
        use_bidirectional_attention=True,
        layer_types=[
            "sliding_attention",
            "sliding_attention",
            "full_attention",
            "sliding_attention",
        ],
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        attn_logit_softcapping=None,
        final_logit_softcapping=None,
        tie_word_embeddings=True,
    )
    kwargs.update(changes)
    return transformers.Gemma3TextConfig(**kwargs)


def randomise(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Weights far from HF's init so that a wrong window, scale, norm or position shows as a
    wrong vector: matrices Laplace with std 0.2 (heavy tails, as trained weights have; see
    make_family_fixtures.randomise), the word table N(0, 0.5), Gemma's norm weights (used as
    ``1 + w``) N(0, 0.3)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(0.3 * noise)
            elif "embed_tokens" in name:
                p.copy_(0.5 * noise)
            else:
                u = torch.rand(p.shape, generator=gen) - 0.5
                p.copy_(-0.2 / 2**0.5 * torch.sign(u) * torch.log1p(-2 * u.abs()))


def build(out: Path, gen: torch.Generator) -> None:
    tok = gemma_tokenizer()
    model = transformers.Gemma3TextModel(gemma_config(tok.get_vocab_size()))
    randomise(model, gen)
    model.eval()
    hidden = model.config.hidden_size
    dense1 = Dense(hidden, 4 * hidden, bias=False, activation_function=torch.nn.Identity())
    dense2 = Dense(4 * hidden, hidden, bias=False, activation_function=torch.nn.Identity())
    randomise(dense1, gen)
    randomise(dense2, gen)
    target = out / NAME / "model"
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(tmp) / "hf"
        model.save_pretrained(str(hf_dir), safe_serialization=True)
        PreTrainedTokenizerFast(
            tokenizer_object=tok,
            model_max_length=MAX_SEQ,
            bos_token="<bos>",
            eos_token="<eos>",
            pad_token="<pad>",
            unk_token="<unk>",
            padding_side="right",
            add_bos_token=True,
            add_eos_token=True,
        ).save_pretrained(str(hf_dir))
        st = SentenceTransformer(
            modules=[
                Transformer(str(hf_dir), max_seq_length=MAX_SEQ),
                Pooling(hidden, pooling_mode="mean"),
                dense1,
                dense2,
                Normalize(),
            ],
            prompts=PROMPTS,
            device="cpu",
        )
        if target.parent.exists():
            shutil.rmtree(target.parent)
        st.save(str(target))
    (target / "README.md").unlink(missing_ok=True)
    st = SentenceTransformer(str(target), device="cpu")  # what a user would load
    if st.max_seq_length != MAX_SEQ:
        raise SystemExit(f"reloaded max_seq_length {st.max_seq_length}")
    vectors = st.encode(TEXTS, batch_size=len(TEXTS), convert_to_numpy=True)
    query = st.encode(TEXTS, batch_size=len(TEXTS), prompt_name="query", convert_to_numpy=True)
    alone = np.concatenate([st.encode([t], convert_to_numpy=True) for t in TEXTS])
    cos = (vectors * alone).sum(1)
    if cos.min() < 0.99999:
        raise SystemExit(f"the reference depends on batch padding: {cos}")
    features = st.tokenize(TEXTS)
    input_ids = unpadded_ids(features)
    if any(ids[0] != 2 or ids[-1] != 1 for ids in input_ids):
        raise SystemExit(f"the tokenizer does not wrap texts in <bos> ... <eos>: {input_ids}")
    np.savez(
        out / NAME / "golden.npz",
        vectors=vectors.astype(np.float32),
        query_vectors=query.astype(np.float32),
    )
    (out / NAME / "golden.json").write_text(
        json.dumps(
            {
                "texts": TEXTS,
                "input_ids": input_ids,
                "prompt_name": "query",
                "made_by": made_by(""),
            },
            indent=1,
            ensure_ascii=False,
        )
        + "\n"
    )
    print(f"{NAME}: dim {vectors.shape[1]}, tokens {[len(i) for i in input_ids]}")


def made_by(flags: str) -> dict[str, str]:
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "script": f"scripts/make_gemma_fixture.py{flags}",
    }


def long_model_dir(fixture: Path, dst: Path) -> Path:
    """The committed model with positions and max length raised to LONG_MAX."""
    shutil.copytree(fixture / "model", dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["max_position_embeddings"] = LONG_MAX
    (dst / "config.json").write_text(json.dumps(cfg))
    tok_cfg = json.loads((dst / "tokenizer_config.json").read_text())
    tok_cfg["model_max_length"] = LONG_MAX
    (dst / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    return dst


def build_long(out: Path) -> None:
    fixture = out / NAME
    with tempfile.TemporaryDirectory() as tmp:
        st = SentenceTransformer(str(long_model_dir(fixture, Path(tmp) / "m")), device="cpu")
        if st.max_seq_length != LONG_MAX:
            raise SystemExit(f"long copy: max_seq_length {st.max_seq_length}")
        gold = json.loads((fixture / "golden.json").read_text())
        short = st.encode(gold["texts"][:-1], convert_to_numpy=True)  # the last is truncated
        cos = (short * np.load(fixture / "golden.npz")["vectors"][:-1]).sum(1)
        if cos.min() < 0.99999:
            raise SystemExit(f"the long-context copy is not the fixture's model: {cos}")

        def count(t: str) -> int:
            return len(st.tokenizer(t)["input_ids"])

        unit = "\n".join(TEXTS[1:]) + "\n"
        reps = 1
        while count(unit * reps) < LONG_TOKENS[0]:
            reps += 1
        text = unit * reps
        while count(text) > LONG_TOKENS[1]:
            text = text[: int(len(text) * 0.99)]
        if not LONG_TOKENS[0] <= count(text) <= LONG_TOKENS[1]:
            raise SystemExit(f"no text of {LONG_TOKENS} tokens: {count(text)}")
        ids = st.tokenize([text])["input_ids"][0].numpy()
        vector = st.encode([text], convert_to_numpy=True)[0]
    np.savez(fixture / "long.npz", input_ids=ids.astype(np.int32), vector=vector.astype(np.float32))
    (fixture / "long.json").write_text(
        json.dumps(
            {
                "text": text,
                "max_seq_length": LONG_MAX,
                "tokens": int(ids.size),
                "made_by": made_by(" (long)"),
            },
            indent=1,
            ensure_ascii=False,
        )
        + "\n"
    )
    print(f"{NAME}: long text of {ids.size} tokens")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("tests/fixtures/families"))
    ap.add_argument(
        "--long-only",
        action="store_true",
        help="only the long-context golden, from the committed fixture",
    )
    args = ap.parse_args()
    torch.manual_seed(SEED)
    if not args.long_only:
        build(args.out, torch.Generator().manual_seed(SEED))
    build_long(args.out)
    size = sum(p.stat().st_size for p in (args.out / NAME).rglob("*") if p.is_file())
    print(f"{NAME}: {size / 1024:.0f} KB in all")


if __name__ == "__main__":
    main()
