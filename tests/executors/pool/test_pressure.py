"""Memory pressure for real: the kernel's OOM killer inside a cgroup limit (fake engine and the
real model), and a memory hog.

Each test runs a pool job in a subprocess (``_RUNNER``) started *inside* a child memory cgroup
of this test process's own (``tests/cgroup_util.py``), so the limit is enforced by the kernel,
the pool's ``detect_limits()`` finds it as the tightest limit, and nothing else on this shared
machine can push the job over it. The fake engine (``embedpool.testing``) allocates activation
memory per padded token (``alloc_bytes_per_token``), touched page by page and freed after the
batch, so memory tracks the batch budget the way the real model's does.

The runner appends every pool event to a JSON-lines file as it happens (the test polls it, with
a deadline, to act at the right moment) and writes every batch's vectors at the end; the test
compares them with ``fake_vectors`` of the same sequences, i.e. with a clean run.

Sizes. What the cgroup is charged for, not RSS (shared library pages were charged to the
parent cgroup when first read): the supervisor and two idle fake workers come to ~68 MiB here.
The OOM test: limit 640 MiB, 1.25 MiB per padded token, WorkBatches of 16 x 64 = 1024 tokens,
the cloud profile (stop 85%, resume 75%), 1 s samples (the default)::

    1024 tokens (the budget): 1280 MiB -> over the limit even alone: the careless budget is killed
     512 tokens (half):        640 MiB -> still over alone: the split half is killed too, which
                                          makes two OOM kills in a row -> emergency mode
     256 tokens (emergency):   320 MiB -> one fits and is calm (~61%, under 75% resume);
                                          two at once would not (~110%)

An allocation that size crosses the limit between two samples: only the kernel sees it
coming, which is the point. After emergency mode the budget stays below the smallest size that
was killed (scaling rule 5), so the job then runs to its end without another kill.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from polling import wait_until
from pool_support import DEADLINE_S

from embedpool import events
from embedpool.testing import fake_vectors, make_sequences

try:
    import cgroup_util
except ImportError:  # tests/ is not on sys.path unless pytest's pythonpath says so
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import cgroup_util

MiB = cgroup_util.MiB
KiB = 1024
REPO = Path(__file__).resolve().parents[3]
DIM = 16

# The cgroup marker makes tests/ci_rules.py check for a writable memory cgroup: a skip
# locally, a failure under CI=true unless EMBEDPOOL_CI_ALLOW_SKIP=cgroup.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.cgroup,
    pytest.mark.usefixtures("no_leftover_processes"),
]

#: The job, run with ``python -c`` (a file as __main__ would be re-imported by every spawned
#: worker). argv[1] is a JSON dict: sequences (n, seed, len), items per WorkBatch, the fake
#: engine spec, the PoolConfig, the events/results paths and, for an open-ended job, a stop
#: file: WorkBatches cycle over the sequences until that file exists (or max_batches).
_RUNNER = r"""
import json, os, sys
import numpy as np
from embedpool.executor import WorkBatch
from embedpool.executors.pool.config import PoolConfig
from embedpool.executors.pool.pool import Pool
from embedpool.testing import FakeEngineSpec, make_sequences

p = json.loads(sys.argv[1])
seqs = make_sequences(p["n"], seed=p["seed"], min_len=p["len"], max_len=p["len"])
k = p["items"]
base = [tuple(seqs[i:i + k]) for i in range(0, len(seqs), k)]
log = open(p["events"], "a", buffering=1)

def on_event(e):
    log.write(json.dumps(e, default=str) + "\n")

def feed():
    i = 0
    while True:
        stop = p.get("stop_file")
        if stop is None and i >= len(base):
            return
        if stop is not None and (os.path.exists(stop) or i >= p["max_batches"]):
            return
        yield WorkBatch(i, base[i % len(base)], tuple(f"b{i}-{j}" for j in range(k)))
        i += 1

with Pool(FakeEngineSpec(**p["spec"]), PoolConfig(**p["config"]), on_event=on_event) as pool:
    got = {r.batch_id: r for r in pool.run(feed())}
    stats = pool.stats()
ids = sorted(got)
np.savez(p["out"], ids=np.array(ids, dtype=np.int64),
         vectors=np.stack([got[i].vectors for i in ids]),
         failed=np.array([len(got[i].failed) for i in ids], dtype=np.int64))
print(json.dumps({"deaths": stats.deaths, "oom_kills": stats.oom_kills}), flush=True)
"""


class Job:
    """The runner in a subprocess inside ``cg``; events readable while it runs."""

    def __init__(self, cg: cgroup_util.MemoryCgroup, tmp: Path, **params: Any) -> None:
        self.events_path = tmp / "events.jsonl"
        self.out = tmp / "out.npz"
        self.params = {"events": str(self.events_path), "out": str(self.out), **params}
        self.events_path.touch()
        self.proc = subprocess.Popen(
            cg.wrap([sys.executable, "-c", _RUNNER, json.dumps(self.params)]),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = []
        for line in self.events_path.read_text().splitlines():
            try:
                e = json.loads(line)
            except json.JSONDecodeError:  # a line being written right now
                continue
            if name is None or e["event"] == name:
                out.append(e)
        return out

    def wait_for(self, what: str, cond: Any, timeout: float = DEADLINE_S) -> None:
        def check() -> bool:
            if self.proc.poll() is not None:
                _, err = self.proc.communicate()
                pytest.fail(
                    f"the job exited ({self.proc.returncode}) while waiting for "
                    f"{what}; stderr:\n{err[-3000:]}"
                )
            return bool(cond())

        wait_until(check, what, timeout=timeout)

    def finish(self, timeout: float = DEADLINE_S) -> dict[str, Any]:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate(timeout=DEADLINE_S)
            pytest.fail(f"the job did not finish within {timeout:.0f} s; stderr:\n{err[-3000:]}")
        assert self.proc.returncode == 0, f"job exited {self.proc.returncode}:\n{err[-3000:]}"
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return result

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=DEADLINE_S)


def check_vectors(job: Job, expected_batches: int | None = None) -> int:
    """Every batch's vectors equal a clean run's (batch i holds base batch i % n_base)."""
    p = job.params
    seqs = make_sequences(p["n"], seed=p["seed"], min_len=p["len"], max_len=p["len"])
    k = p["items"]
    base = [fake_vectors(seqs[i : i + k], DIM) for i in range(0, len(seqs), k)]
    with np.load(job.out) as data:
        ids, vectors, failed = data["ids"], data["vectors"], data["failed"]
    assert list(ids) == list(range(len(ids))), "a batch is missing"
    if expected_batches is not None:
        assert len(ids) == expected_batches
    assert not failed.any(), "an item was given up"
    for i, got in zip(ids, vectors, strict=True):
        cos = np.sum(got * base[int(i) % len(base)], axis=1)
        assert cos.min() >= 0.99999, f"batch {i} differs from a clean run (cos {cos.min()})"
    return len(ids)


# --- the kernel's OOM killer -------------------------------------------------------------------


def test_cgroup_oom_kills_are_survived_with_emergency_mode(
    tmp_path: Path, cgroup_factory: Any
) -> None:
    cg = cgroup_factory(640 * MiB)
    job = Job(
        cg,
        tmp_path,
        n=48,
        seed=21,
        len=64,
        items=16,
        spec={"dim": DIM, "alloc_bytes_per_token": 1280 * KiB, "delay_per_batch_s": 0.02},
        config={
            "workers": 2,
            "profile": "cloud",
            "batch_tokens": 1024,
            "status_interval_s": 0,
            "emergency_exit_s": 1.0,
            "start_timeout_s": 60.0,
        },
    )
    try:
        stats = job.finish(timeout=120.0)
    finally:
        job.kill()
    check_vectors(job, expected_batches=3)

    deaths = job.events(events.WORKER_DEATH)
    kernel_kills = cg.oom_kills()
    assert len(deaths) >= 2, "the careless full budget was never OOM-killed"
    assert {e["exit"] for e in deaths} == {"SIGKILL(-9)"}
    assert all("OOM" in e["cause"] for e in deaths)
    # every kill the kernel counted in the cgroup is a worker death the pool reported: the
    # supervisor (which holds the results) was never the victim
    assert kernel_kills == len(deaths) == stats["deaths"] == stats["oom_kills"]

    emergency = [e["on"] for e in job.events(events.EMERGENCY)]
    assert emergency[:2] == [True, False], f"emergency events: {emergency}"
    first_on = next(e for e in job.events(events.EMERGENCY) if e["on"])
    assert "2 consecutive OOM kills" in first_on["reason"]
    scale = job.events(events.SCALE)
    assert any(e["batch_tokens_to"] < e["batch_tokens_from"] for e in scale)
    print(
        f"\ncgroup OOM: {kernel_kills} kernel OOM kills, {len(deaths)} worker deaths, "
        f"emergency {emergency}, {len(scale)} scale events"
    )


# --- an external memory hog ---------------------------------------------------------------------

#: Allocates argv[1] MiB a page-touching MiB at a time, says so, then holds it until its stdin
#: closes.
_HOG = r"""
import sys
hold = [b"\x01" * (1 << 20) for _ in range(int(sys.argv[1]))]
print("allocated", flush=True)
sys.stdin.read()
"""


def test_memory_hog_shrinks_the_pool_which_grows_back_after(
    tmp_path: Path, cgroup_factory: Any
) -> None:
    """A 1 GiB cgroup (local profile: stop at 80%, resume below 70%): a hog in the same cgroup
    takes ~700 MiB while the pool runs 2 workers. The pool shrinks with an event whose reading
    shows memory over 80%; once the hog exits it grows back to 2, and the job completes."""
    limit = 1024 * MiB
    cg = cgroup_factory(limit)
    stop = tmp_path / "stop"
    job = Job(
        cg,
        tmp_path,
        n=64,
        seed=22,
        len=32,
        items=8,
        stop_file=str(stop),
        max_batches=100_000,
        spec={"dim": DIM, "delay_per_batch_s": 0.02},
        config={
            "workers": 2,
            "profile": "local",
            "batch_tokens": 256,
            "sample_interval_s": 0.2,
            "status_interval_s": 0,
            "start_timeout_s": 60.0,
        },
    )
    hog: subprocess.Popen[str] | None = None
    try:
        job.wait_for("2 workers ready", lambda: len(job.events(events.WORKER_READY)) >= 2)
        # The hog takes what is left up to ~85% of the limit: over the 80% stop, under the
        # limit itself (so nothing is OOM-killed).
        used_mib = cg.usage() // MiB
        hog_mib = int(0.85 * limit / MiB) - used_mib
        assert hog_mib > 300, f"the pool already uses {used_mib} MiB of the 1 GiB limit"
        hog = subprocess.Popen(
            cg.wrap([sys.executable, "-c", _HOG, str(hog_mib)]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

        def shrunk() -> bool:
            return any(e["action"] == "shrink" for e in job.events(events.SCALE))

        job.wait_for("a shrink under the hog's pressure", shrunk)
        (shrink,) = [e for e in job.events(events.SCALE) if e["action"] == "shrink"][:1]
        assert shrink["workers_from"] == 2 and shrink["workers_to"] == 1
        reading = shrink["reading"]
        assert reading["mem_limit"] == limit
        assert "80%" in shrink["reason"]
        # now or two steps ahead over the stop threshold (the reason gives both)
        assert reading["mem_fraction"] >= 0.80 or "predicted" in shrink["reason"]

        assert hog.stdin is not None
        hog.stdin.close()
        hog.wait(DEADLINE_S)

        def grew_back() -> bool:
            after = job.events(events.SCALE)
            i = after.index(shrink)
            return any(e["action"] == "grow" and e["workers_to"] == 2 for e in after[i + 1 :])

        job.wait_for("the pool to grow back after the hog left", grew_back)
        grow = next(
            e for e in job.events(events.SCALE) if e["action"] == "grow" and e["ts"] > shrink["ts"]
        )
        assert grow["reading"]["mem_fraction"] < 0.70
        stop.touch()
        job.finish()
    finally:
        if hog is not None and hog.poll() is None:
            hog.kill()
            hog.wait(DEADLINE_S)
        if hog is not None:
            for pipe in (hog.stdin, hog.stdout):
                if pipe is not None:
                    pipe.close()
        job.kill()
    n = check_vectors(job)
    left = job.events(events.WORKER_EXIT)
    assert any(e["reason"] == "scale-down" for e in left)
    assert job.events(events.WORKER_DEATH) == [], "the hog caused a death, not a shrink"
    assert cg.oom_kills() == 0
    print(
        f"\nhog: {hog_mib} MiB; shrink at {shrink['reading']['mem_fraction']:.0%}, grow back "
        f"at {grow['reading']['mem_fraction']:.0%}; {n} batches"
    )


# --- the real model under a real limit -------------------------------------------------------

#: The real model (fp32: batch-invariant, see test_real_model_pool.py) on 32 standard-library
#: chunks of exactly 256 tokens, one WorkBatch of 32 x 256 = 8192 padded tokens (a careless
#: budget: ``--batch-tokens 8192``). Vectors go to ``out`` in input order.
_REAL_RUNNER = r"""
import json, sys
import numpy as np
from embedpool.engine import EngineSpec
from embedpool.models import resolve_model
from embedpool.executors.pool.config import PoolConfig
from embedpool.executors.pool.pool import Pool
from embedpool.testing import make_batches
from embedpool.tokenization import TextTokenizer

p = json.loads(sys.argv[1])
model = resolve_model("all-MiniLM-L6-v2")
seqs = [np.asarray(s, dtype=np.int32) for s in json.load(open(p["seqs"]))]
log = open(p["events"], "a", buffering=1)

def on_event(e):
    log.write(json.dumps(e, default=str) + "\n")

with Pool(EngineSpec(model, "fp32", 1), PoolConfig(**p["config"]), on_event=on_event) as pool:
    (r,) = list(pool.run(make_batches(seqs, len(seqs))))
    stats = pool.stats()
assert not r.failed, r.failed
np.save(p["out"], r.vectors)
print(json.dumps({"deaths": stats.deaths, "oom_kills": stats.oom_kills}), flush=True)
"""


def test_real_model_oom_killed_in_a_cgroup_completes_exactly(
    tmp_path: Path, cgroup_factory: Any
) -> None:
    """Measured here (cgroup charge, fp32): supervisor + one loaded worker ~300 MiB; a
    32 x 256-token batch adds ~280 MiB (over a 440 MiB limit: the kernel kills it); its
    16 x 256 halves peaked at ~431 MiB (fit, or are killed too: then emergency mode takes
    over). Either way the job completes with a clean run's vectors."""
    from embedpool.corpus import stdlib_chunks
    from embedpool.engine import EngineSpec
    from embedpool.models import resolve_model
    from embedpool.tokenization import TextTokenizer

    model = resolve_model("all-MiniLM-L6-v2")
    engine = EngineSpec(model, "fp32", 1).build()
    encoded = (
        TextTokenizer(model.tokenizer_path, 256)
        .encode([c.text for c in stdlib_chunks(400)])
        .sequences
    )
    # 48 x 256: after the workers' malloc_trim and memory-pattern changes, 32 x 256 sometimes
    # fit under 440 MiB; 48 x 256 (~410 MiB of activations) never does.
    seqs = [s for s in encoded if len(s) == 256][:48]
    assert len(seqs) == 48
    clean = engine.embed(seqs)
    del engine
    seqs_path = tmp_path / "seqs.json"
    seqs_path.write_text(json.dumps([s.tolist() for s in seqs]))

    cg = cgroup_factory(440 * MiB)
    events_path, out = tmp_path / "events.jsonl", tmp_path / "vectors.npy"
    events_path.touch()
    params = {
        "seqs": str(seqs_path),
        "events": str(events_path),
        "out": str(out),
        "config": {
            "workers": 2,
            "profile": "cloud",
            "batch_tokens": 12288,
            "status_interval_s": 0,
            "emergency_exit_s": 2.0,
        },
    }
    proc = subprocess.Popen(
        cg.wrap([sys.executable, "-c", _REAL_RUNNER, json.dumps(params)]),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=DEADLINE_S)
    assert proc.returncode == 0, stderr[-3000:]
    stats = json.loads(stdout.strip().splitlines()[-1])
    got = np.load(out)
    cos = np.sum(got * clean, axis=1)
    assert cos.min() >= 0.99999, f"min cos {cos.min()}"

    logged = [json.loads(line) for line in events_path.read_text().splitlines()]
    deaths = [e for e in logged if e["event"] == events.WORKER_DEATH]
    kernel_kills = cg.oom_kills()
    assert kernel_kills >= 1, "the 12288-token batch was never OOM-killed"
    assert kernel_kills == len(deaths) == stats["oom_kills"]
    assert {e["exit"] for e in deaths} == {"SIGKILL(-9)"}
    assert deaths[0]["tokens"] == 12288
    splits = [e for e in logged if e["event"] == events.SPLIT]
    assert splits and splits[0]["halves"] == [24, 24]
    ready = [e["rss"] >> 20 for e in logged if e["event"] == events.WORKER_READY]
    print(
        f"\nreal model in a 440 MiB cgroup: {kernel_kills} kernel OOM kill(s), worker RSS "
        f"after load {min(ready)}-{max(ready)} MiB, min cos {cos.min():.7f}"
    )
