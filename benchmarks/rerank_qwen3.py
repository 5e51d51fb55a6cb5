"""Qwen3-Reranker pairs per second: embedpool's Reranker against sentence-transformers'
CrossEncoder (fp32, its defaults) on the same pairs, in one run, at Qwen3-Reranker-0.6B's
width with a few of its layers.

    python benchmarks/rerank_qwen3.py [--layers 4] [--queries 2] [--docs 8] [--rounds 2]
                                      [--threads 2] [--precisions int8,fp32] [--work DIR]

The model: a random-weight ``Qwen3ForCausalLM`` with Qwen3-Reranker-0.6B's block (hidden
1024, 16 query / 8 kv heads of 128, MLP 3072, untied lm_head) and ``--layers`` of its 28
layers (transformers' own initialisation: the fixtures' wide random weights overflow at
this width), the test fixture's small Qwen-style tokenizer (``make_reranker_fixtures
.qwen3_tokenizer``: ~800 tokens, so the token table is small and texts take more tokens than
Qwen's own tokenizer gives them) with the reranker's chat template and a 512-token window,
and lm_head's yes row along the last token's first principal component over the pairs
(``qwen3_head``), saved by CrossEncoder 6.3. Weights cannot be downloaded here.

Pairs, processes and measures are ``benchmarks/rerank.py``'s (its RUN_CE / RUN_EP): each
measurement its own process, alternating systems, pairs per wall second and per CPU second,
the ratio to CrossEncoder in the same run, fp32's largest |score difference| and int8's
Spearman per query against CrossEncoder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rerank import (  # benchmarks/ is not a package
    DEV_PYTHON,
    QUERIES,
    ROOT,
    cpu_name,
    measure,
    report,
    run,
    stdlib_chunks,
)

MAKE = r"""
import json, shutil, sys
from pathlib import Path
import torch, transformers
from sentence_transformers import CrossEncoder
root, out, pairs_path, layers = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
sys.path.insert(0, str(root / "scripts"))
import make_reranker_fixtures as mrf
mrf.QWEN3_MAX_LEN = 512
torch.manual_seed(0)
tok = mrf.qwen3_tokenizer()
tok.chat_template = mrf.QWEN3_TEMPLATE
eid = tok.convert_tokens_to_ids("<|endoftext|>")
cfg = transformers.Qwen3Config(
    vocab_size=len(tok), hidden_size=1024, intermediate_size=3072, num_hidden_layers=layers,
    num_attention_heads=16, num_key_value_heads=8, head_dim=128, hidden_act="silu",
    max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, attention_bias=False,
    use_sliding_window=False, bos_token_id=eid, eos_token_id=eid, pad_token_id=eid)
model = transformers.Qwen3ForCausalLM(cfg)  # transformers' init (std 0.02): finite at this width
model.eval()
pairs = [tuple(p) for p in json.loads(pairs_path.read_text())]
mrf.qwen3_head(model, tok, pairs, tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no"))
tmp = out.parent / (out.name + ".hf")
shutil.rmtree(tmp, ignore_errors=True)
model.save_pretrained(str(tmp), safe_serialization=True)
tok.save_pretrained(str(tmp))
CrossEncoder(str(tmp), device="cpu").save(str(out))
shutil.rmtree(tmp)
print(json.dumps({"layers": layers, "vocab": len(tok)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--queries", type=int, default=2)
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--chars", type=int, default=600, help="characters per document")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precisions", default="int8,fp32")
    ap.add_argument("--work", type=Path, default=Path("/tmp/embedpool-rerank-qwen3-bench"))
    args = ap.parse_args()
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    queries = QUERIES[: args.queries]
    docs = [c[: args.chars] for c in stdlib_chunks(args.docs)]
    pairs = [[q, d] for q in queries for d in docs]
    pairs_path = work / "pairs.json"
    pairs_path.write_text(json.dumps(pairs))
    model_dir = work / f"qwen3-reranker-0.6b-width-{args.layers}-layers"
    if not (model_dir / "model.safetensors").is_file():
        print(run(DEV_PYTHON, MAKE, str(ROOT), str(model_dir), str(pairs_path), str(args.layers)))
    precisions = args.precisions.split(",")
    results = measure(model_dir, pairs_path, precisions, args.threads, args.rounds)
    print(
        f"{len(pairs)} pairs ({len(queries)} queries x {len(docs)} stdlib chunks of "
        f"{args.chars} chars), {args.layers} layers, {args.rounds} rounds, {args.threads} "
        f"threads, medians; CPU: {cpu_name()}"
    )
    report(results, precisions, len(queries), len(docs))


if __name__ == "__main__":
    main()
