"""``serve --backend ray``: the same server in front of Ray actors, on a real local Ray cluster
(``ray_cluster`` in tests/conftest.py) and under the official ``openai`` client.

Most tests run the app in this process over the session's cluster with the fake engine of
``embedpool.testing`` in the actors (its poison, hang and hold hooks work across processes);
two run real server processes: ``embedpool serve --backend ray`` with the real model joining
the session's cluster, and a SIGTERM drain of a server that started its own private Ray.
Every wait has a deadline; a ray.init costs 10-20 s here, so the tests are few.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import numpy as np
import psutil
import pytest
from polling import wait_until
from server_support import DIM, LiveServer, decode_base64, expected_vectors

from embedpool.executors.ray.executor import RayExecutor
from embedpool.faults import FaultPolicy
from embedpool.models import ResolvedModel
from embedpool.server.on_ray import ray_executor_factory
from embedpool.testing import FakeEngineSpec
from embedpool.tokenization import TextTokenizer
from embedpool.types import Event

pytestmark = pytest.mark.ray

DEADLINE_S = 120.0  # one wait; reaching it means a hang, not slowness
#: A server process's start: a private ray.init (10-20 s here, more on a loaded machine) or
#: joining a cluster, building or finding the int8 graph, the actors' start.
START_DEADLINE_S = 240.0
TEXTS = [
    "def add(a, b):\n    return a + b",
    "hello world",
    "Ray actors behind one endpoint",
    "class Pool:\n    '''A pool of workers.'''",
    "x" * 3000,
    "über naïve café",
    "?",
    *(f"item {i}: " + "word " * (i * 7 % 60) for i in range(13)),
]


def wait_for(cond: Callable[[], bool], what: str, deadline_s: float = DEADLINE_S) -> None:
    wait_until(cond, what, timeout=deadline_s, interval=0.05)


def metric(url: str, name: str) -> float:
    """One sample of /metrics, by its full name with labels (0.0 when absent)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return next(
        (
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name + " ")
        ),
        0.0,
    )


def post(url: str, texts: list[str]) -> httpx.Response:
    return httpx.post(f"{url}/v1/embeddings", json={"input": texts}, timeout=DEADLINE_S)


def assert_vectors(r: httpx.Response, want: np.ndarray) -> None:
    assert r.status_code == 200, r.text
    got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
    np.testing.assert_array_equal(got, want)


def as_vector(embedding: Any) -> np.ndarray:
    """An embedding as the openai client returns it: floats, or the base64 string it was
    asked for explicitly."""
    if isinstance(embedding, str):
        return decode_base64(embedding)
    return np.array(embedding, dtype=np.float32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def ray_serve(
    ray_cluster: ModuleType, serve: Callable[..., LiveServer]
) -> Callable[..., LiveServer]:
    """``ray_serve(spec, actors=2, policy=None, on_event=None, **settings)``: the app over a
    RayExecutor on the session's cluster, serving once every actor is ready."""

    def start(
        spec: FakeEngineSpec,
        *,
        actors: int = 2,
        policy: FaultPolicy | None = None,
        on_event: Callable[[Event], None] | None = None,
        **settings: Any,
    ) -> LiveServer:
        live = serve(
            ray_executor_factory(spec, actors=actors, policy=policy, on_event=on_event), **settings
        )
        wait_for(lambda: idle_actors(live) == actors, f"{actors} idle actors")
        return live

    return start


def executor_of(live: LiveServer) -> RayExecutor:
    ex = live.app.state.runtime.executor
    assert isinstance(ex, RayExecutor)
    return ex


def idle_actors(live: LiveServer) -> int:
    return sum(w.state == "idle" for w in executor_of(live).stats().workers)


def busy_actor_pid(live: LiveServer) -> int | None:
    return next(
        (w.pid for w in executor_of(live).stats().workers if w.state == "busy" and w.pid), None
    )


def client_texts(c: int) -> list[str]:
    return [f"client {c} item {i} " + "word " * ((c * 5 + i) % 30) for i in range(10)]


# --- the real model, the real command line ----------------------------------------------


@pytest.mark.slow
def test_cli_serve_on_ray_answers_as_the_local_server(
    ray_cluster: ModuleType, serve: Callable[..., LiveServer], model: ResolvedModel
) -> None:
    """``embedpool serve --backend ray --ray-address`` (real model, int8) joins the session's
    cluster: float and base64 vectors equal the local server's for the same texts; /ready,
    /health and /metrics answer as locally; SIGTERM stops its actors, not the cluster."""
    from embedpool.graph import prepare_onnx
    from embedpool.server import default_executor_factory

    prepare_onnx(model, "int8")  # built once (or found) here, for both servers
    local = serve(default_executor_factory(model, "int8"))
    address = os.environ.get("RAY_ADDRESS") or ray_cluster.get_runtime_context().gcs_address
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "embedpool",
            "serve",
            "--backend",
            "ray",
            "--ray-address",
            address,
            "--workers",
            "2",
            "--port",
            str(port),
            "--no-cache",
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(lambda: _answers(proc, url), "the Ray server to start", START_DEADLINE_S)
        ready = httpx.get(f"{url}/ready", timeout=DEADLINE_S)
        assert ready.status_code == 200 and ready.json()["status"] == "ready", ready.text
        assert httpx.get(f"{url}/health", timeout=DEADLINE_S).json() == {"status": "ok"}
        from openai import OpenAI

        clients = [
            OpenAI(base_url=f"{u}/v1", api_key="unused", max_retries=0, timeout=DEADLINE_S)
            for u in (url, local.url)
        ]
        for fmt in ("float", "base64"):
            got, want = (
                c.embeddings.create(model="all-MiniLM-L6-v2", input=TEXTS, encoding_format=fmt)
                for c in clients
            )
            assert len(got.data) == len(TEXTS) == len(want.data)
            assert got.usage.prompt_tokens == want.usage.prompt_tokens
            for g, w in zip(got.data, want.data, strict=True):
                gv, wv = as_vector(g.embedding), as_vector(w.embedding)
                assert gv.shape == (model.dim,)
                assert float(gv @ wv) >= 0.9999, (fmt, g.index)
        # the client's default: base64 on the wire, decoded to floats
        default = clients[0].embeddings.create(model="all-MiniLM-L6-v2", input=TEXTS[:3])
        assert len(default.data[2].embedding) == model.dim
        assert metric(url, 'embedpool_executor_info{backend="ray"}') == 1.0
        assert metric(url, "embedpool_max_workers") == 2.0
        assert metric(url, 'embedpool_requests_total{route="/v1/embeddings",status="200"}') == 3.0
        assert metric(url, "embedpool_worker_deaths_total") == 0.0
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(DEADLINE_S)
        output = _output(proc)
        assert rc in (0, -signal.SIGTERM) and "SIGTERM received" not in output, output
        # its actors are gone (their CPUs are free again); the cluster it joined is not
        wait_for(
            lambda: (
                ray_cluster.available_resources().get("CPU", 0.0)
                == ray_cluster.cluster_resources().get("CPU")
            ),
            "the actors' CPUs to be freed",
        )
    finally:
        _stop(proc)


@pytest.mark.slow
def test_cli_serve_on_ray_serves_several_models_through_one_registry(
    ray_cluster: ModuleType, tmp_path: Path
) -> None:
    """``embedpool serve --backend ray --model A --model B`` (two family fixtures, fp32, one
    actor each, joining the session's cluster): each model answers with its in-process
    vectors; a model unloaded (Ollama's ``keep_alive: 0``) stops its own actors only, the
    other's keep answering (the server holds one Ray for all, which no model's executor shuts
    down), and it loads again on its next request."""
    import shutil
    from dataclasses import replace

    from ollama import Client

    from embedpool.models import resolve_model
    from embedpool.placement import executor_factory, place
    from embedpool.server import ServerSettings, create_app

    families = Path(__file__).parent.parent / "fixtures" / "families"
    names = ("modernbert-tiny", "xlmr-tiny")
    texts = TEXTS[:4]
    want: dict[str, np.ndarray] = {}
    for name, family in zip(names, ("modernbert", "xlmr"), strict=True):
        shutil.copytree(families / family / "model", tmp_path / name, copy_function=os.link)
        m = resolve_model(tmp_path / name)
        local = LiveServer.start(
            create_app(
                replace(ServerSettings(api_key=""), precision="fp32"),
                executor_factory(m, place(m, device="cpu", precision="fp32"), workers=None),
                model=m,
            )
        )
        try:
            r = httpx.post(f"{local.url}/v1/embeddings", json={"input": texts}, timeout=DEADLINE_S)
            assert r.status_code == 200, r.text
            want[name] = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
        finally:
            local.stop()
    address = os.environ.get("RAY_ADDRESS") or ray_cluster.get_runtime_context().gcs_address
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [
        sys.executable,
        "-m",
        "embedpool",
        "serve",
        "--backend",
        "ray",
        "--ray-address",
        address,
        "--workers",
        "1",
        "--precision",
        "fp32",
        "--preload",
        "all",
        "--port",
        str(port),
        "--no-cache",
        "--log-level",
        "warning",
    ]
    for name in names:
        argv += ["--model", str(tmp_path / name)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = Client(host=url, timeout=DEADLINE_S)
    try:
        wait_for(lambda: _answers(proc, url), "the Ray server to start", START_DEADLINE_S)

        def states() -> dict[str, str]:
            data = httpx.get(f"{url}/v1/models", timeout=DEADLINE_S).json()["data"]
            return {d["id"]: d["state"] for d in data if d["id"] in names}

        def check(name: str, keep_alive: float | None = None) -> None:
            got = client.embed(model=name, input=texts, keep_alive=keep_alive).embeddings
            np.testing.assert_allclose(
                np.array(got, dtype=np.float32), want[name], atol=1e-5, err_msg=name
            )

        assert states() == dict.fromkeys(names, "loaded")
        a, b = names
        check(b)
        check(a, keep_alive=0)  # a (whose executor came first) unloads after this request
        wait_for(lambda: states()[a] == "unloaded", "a unloaded")
        check(b)  # b's actors outlive a's executor
        assert states() == {a: "unloaded", b: "loaded"}
        check(a)  # and a loads again, its actors anew
        assert states() == dict.fromkeys(names, "loaded")
        text = httpx.get(f"{url}/metrics", timeout=DEADLINE_S).text
        for name in names:
            assert f'embedpool_model_worker_deaths_total{{model="{name}"}} 0.0' in text
    finally:
        client._client.close()
        _stop(proc)


def _answers(proc: subprocess.Popen[str], url: str) -> bool:
    assert proc.poll() is None, f"the server exited: {_output(proc)}"
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def _output(proc: subprocess.Popen[str]) -> str:
    """What an exited server printed (the last 20,000 characters)."""
    if proc.poll() is None or proc.stdout is None:
        return ""
    return proc.stdout.read()[-20000:]


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)
    if proc.stdout is not None:
        proc.stdout.close()


# --- SIGTERM: drain, then stop the actors and the private Ray ---------------------------


@pytest.mark.slow
def test_sigterm_drains_then_stops_actors_and_its_private_ray(
    tmp_path: Path, tokenizer: TextTokenizer
) -> None:
    """A server that started its own Ray: after SIGTERM it accepts no new connection, still
    answers the request held in its actor, then exits and leaves no Ray process behind."""
    hold = tmp_path / "hold"
    hold.touch()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a private instance
    script = Path(__file__).with_name("serve_fake.py")
    proc = subprocess.Popen(
        [sys.executable, str(script), str(port), "0", "--ray", "--hold", str(hold)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        wait_for(lambda: _answers(proc, url), "the server to start its Ray", START_DEADLINE_S)
        ray_procs = psutil.Process(proc.pid).children(recursive=True)
        names = {p.name() for p in ray_procs}
        assert {"raylet", "gcs_server"} <= names, names  # Ray is the server's own
        result: list[httpx.Response] = []
        texts = ["held in the actor during SIGTERM"]
        t = threading.Thread(target=lambda: result.append(post(url, texts)))
        t.start()
        wait_for(lambda: metric(url, "embedpool_inflight_batches") >= 1, "a batch in flight")
        proc.send_signal(signal.SIGTERM)

        def refused() -> bool:
            try:
                httpx.get(f"{url}/health", timeout=5)
            except httpx.TransportError:
                return True
            return False

        wait_for(refused, "the server to stop accepting connections")
        assert t.is_alive() and not result, "the request finished before the drain began"
        hold.unlink()  # let the batch go: the draining server must still answer it
        t.join(DEADLINE_S)
        assert result, "no answer to the request in flight"
        assert_vectors(result[0], expected_vectors(tokenizer, texts))
        rc = proc.wait(DEADLINE_S)
        output = _output(proc)
        assert rc in (0, -signal.SIGTERM), output
        # Ray's core worker installs abseil's failure handler for SIGTERM, which dumps a stack
        # and then (not always) aborts: the server must have put uvicorn's handler back.
        assert "SIGTERM received" not in output, output
        _, alive = psutil.wait_procs(ray_procs, timeout=DEADLINE_S)
        assert not alive, f"Ray processes left behind: {[(p.pid, p.name()) for p in alive]}"
    finally:
        hold.unlink(missing_ok=True)
        _stop(proc)


# --- faults, on the session's cluster ---------------------------------------------------


def test_an_actor_sigkilled_mid_request_loses_nothing(
    ray_serve: Callable[..., LiveServer], tokenizer: TextTokenizer
) -> None:
    live = ray_serve(FakeEngineSpec(dim=DIM, delay_per_token_s=2e-4), batch_tokens=256)
    killed: list[int] = []

    def kill_a_busy_actor() -> None:
        wait_for(lambda: busy_actor_pid(live) is not None, "a busy actor")
        pid = busy_actor_pid(live)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    def client(c: int) -> list[httpx.Response]:
        return [post(live.url, client_texts(c)) for _ in range(3)]

    with ThreadPoolExecutor(9) as pool:
        futures = [pool.submit(client, c) for c in range(8)]
        pool.submit(kill_a_busy_actor).result(DEADLINE_S)
        responses = [f.result(DEADLINE_S) for f in futures]
    assert killed
    for c, rs in enumerate(responses):
        for r in rs:
            assert_vectors(r, expected_vectors(tokenizer, client_texts(c)))
    assert metric(live.url, "embedpool_worker_deaths_total") >= 1
    assert metric(live.url, "embedpool_batch_retries_total") >= 1
    assert metric(live.url, "embedpool_oom_kills_total") == 0  # no evidence of the OOM killer
    wait_for(lambda: idle_actors(live) == 2, "the dead actor's replacement")
    assert killed[0] not in {w.pid for w in executor_of(live).stats().workers}
    assert httpx.get(f"{live.url}/health", timeout=DEADLINE_S).status_code == 200


@pytest.mark.parametrize(
    ("hook", "says"),
    [
        ("crash_on", "died while embedding it 2 times"),
        ("hang_on", "hung on it and was killed 2 times"),
    ],
    ids=["kills-its-actor", "hangs-its-actor"],
)
def test_a_poison_input_is_422_and_nothing_else_is_lost(
    ray_serve: Callable[..., LiveServer], tokenizer: TextTokenizer, hook: str, says: str
) -> None:
    """An input that kills (or hangs) every actor that embeds it: its request gets a 422
    naming its index after 1 + max_retries tries alone; the requests sharing its batches get
    their vectors; a hung actor is killed at the deadline and replaced."""
    poison = tuple(tokenizer.token_ids("poison"))
    policy = FaultPolicy(max_retries=1, hang_base_s=2.0, hang_per_token_s=0.0)
    spec = (
        FakeEngineSpec(dim=DIM, crash_on=poison)
        if hook == "crash_on"
        else FakeEngineSpec(dim=DIM, hang_on=poison)
    )
    live = ray_serve(spec, policy=policy)
    bad = ["fine", "also fine", "this is poison", "ok"]
    with ThreadPoolExecutor(7) as pool:
        poisoned = pool.submit(post, live.url, bad)
        others = {c: pool.submit(post, live.url, client_texts(c)) for c in range(6)}
        r = poisoned.result(DEADLINE_S)
        for c, f in others.items():
            assert_vectors(f.result(DEADLINE_S), expected_vectors(tokenizer, client_texts(c)))
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["param"] == "input[2]" and err["code"] == "input_failed"
    assert "input[2]" in err["message"] and says in err["message"], err["message"]
    # the request's other inputs were embedded: without the poison it is answered at once
    clean = [t for t in bad if "poison" not in t]
    assert_vectors(post(live.url, clean), expected_vectors(tokenizer, clean))
    assert metric(live.url, "embedpool_poison_inputs_total") == 1
    deaths = metric(live.url, "embedpool_worker_deaths_total")
    assert deaths >= 2  # at least the two tries of the poison alone
    if hook == "hang_on":
        assert metric(live.url, "embedpool_hung_kills_total") == deaths
    wait_for(lambda: idle_actors(live) == 2, "the replacements")
    assert httpx.get(f"{live.url}/health", timeout=DEADLINE_S).status_code == 200


def test_a_full_queue_is_429_with_retry_after(
    ray_serve: Callable[..., LiveServer], tokenizer: TextTokenizer, tmp_path: Path
) -> None:
    hold = tmp_path / "hold"
    hold.touch()
    live = ray_serve(
        FakeEngineSpec(dim=DIM, hold_while_exists=str(hold)), actors=1, max_queue_tokens=20
    )
    first: list[httpx.Response] = []
    t = threading.Thread(target=lambda: first.append(post(live.url, ["one two three"])))
    t.start()
    try:
        wait_for(lambda: busy_actor_pid(live) is not None, "the first request on the actor")
        r = post(live.url, ["this request does not fit in the queue at all, " * 3])
        assert r.status_code == 429, r.text
        err = r.json()["error"]
        assert err["code"] == "queue_full" and err["type"] == "rate_limit_error"
        assert int(r.headers["Retry-After"]) >= 1
    finally:
        hold.unlink()
        t.join(DEADLINE_S)
    assert first, "the first request got no answer"
    assert_vectors(first[0], expected_vectors(tokenizer, ["one two three"]))
    assert metric(live.url, 'embedpool_rejected_requests_total{reason="queue_full"}') == 1
    assert post(live.url, ["afterwards"]).status_code == 200


def test_health_is_red_while_the_executor_is_stuck_or_broken(
    ray_serve: Callable[..., LiveServer],
    tokenizer: TextTokenizer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """/health turns red when the Ray executor's manager is stuck (here: in an on_event
    callback that blocks), green again when it moves on; and red for good, with /ready and
    requests at 503, when no replacement actor can start."""
    from embedpool.executors.ray import executor as ray_executor

    monkeypatch.setattr(ray_executor, "MANAGER_SILENT_S", 1.0)
    no_start = tmp_path / "no-start"
    blocking, release = threading.Event(), threading.Event()

    def on_event(event: Event) -> None:
        if event["event"] == "worker_death" and blocking.is_set():
            release.wait(DEADLINE_S)

    live = ray_serve(
        FakeEngineSpec(dim=DIM, fail_to_start_if_exists=str(no_start)), actors=1, on_event=on_event
    )

    def health() -> httpx.Response:
        return httpx.get(f"{live.url}/health", timeout=DEADLINE_S)

    def kill_the_actor() -> None:
        (w,) = executor_of(live).stats().workers
        assert w.pid is not None
        os.kill(w.pid, signal.SIGKILL)

    # 1. stuck: the manager blocks in the callback for the death the next request reveals
    blocking.set()
    kill_the_actor()
    answer: list[httpx.Response] = []
    t = threading.Thread(target=lambda: answer.append(post(live.url, ["after a death"])))
    t.start()
    try:
        wait_for(lambda: health().status_code == 503, "/health to turn red")
        assert "stuck" in health().json()["reason"]
    finally:
        release.set()
    t.join(DEADLINE_S)
    assert answer and answer[0].status_code == 200, answer
    wait_for(lambda: health().status_code == 200, "/health to turn green again")
    # 2. broken: the actor dies and no replacement can load its engine
    blocking.clear()
    wait_for(lambda: idle_actors(live) == 1, "the replacement actor")
    no_start.touch()
    kill_the_actor()
    r = post(live.url, ["no actor left"])
    assert r.status_code == 503 and r.json()["error"]["code"] == "pool_unavailable", r.text
    wait_for(lambda: health().status_code == 503, "/health to turn red for good")
    assert "broken" in health().json()["reason"]
    assert httpx.get(f"{live.url}/ready", timeout=DEADLINE_S).status_code == 503
    assert metric(live.url, "embedpool_worker_start_failures_total") == 3
    assert metric(live.url, "embedpool_pool_broken") == 1


# --- the command line's refusals ----------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (
            ["--backend", "ray", "--workers", "0"],
            "--workers 0 (in-process) is for the local backend",
        ),
        (["--backend", "ray", "--max-memory", "1G"], "--max-memory: for the local pool only"),
        (["--backend", "ray", "--profile", "wsl2"], "--profile: for the local pool only"),
        (["--ray-address", "127.0.0.1:6379"], "--ray-address needs --backend ray"),
    ],
    ids=["workers-0", "max-memory", "profile", "address-without-ray"],
)
def test_serve_refuses_what_ray_cannot_do_with_exit_2(args: list[str], says: str) -> None:
    from click.testing import CliRunner

    from embedpool.cli import main

    result = CliRunner().invoke(main, ["serve", "--no-cache", "--port", "0", *args])
    assert result.exit_code == 2, result.output
    assert says in result.output, result.output


def test_serve_at_an_address_where_nothing_answers_exits_2_at_once() -> None:
    """In a process of its own: one already connected to Ray (this one, once ray_cluster has
    run) keeps its connection whatever the address."""
    closed = free_port()  # bound and released: nothing listens there
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "embedpool",
            "serve",
            "--backend",
            "ray",
            "--ray-address",
            f"127.0.0.1:{closed}",
            "--no-cache",
            "--port",
            "0",
            "--log-level",
            "warning",
        ],
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
        env=env,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"nothing answers at 127.0.0.1:{closed}" in done.stderr, done.stderr[-3000:]


def test_unreachable_lets_ray_resolve_what_is_not_host_port() -> None:
    from embedpool.executors.ray.cluster import unreachable

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        assert unreachable(f"127.0.0.1:{listening.getsockname()[1]}") is None
    for address in ("auto", "ray://head:10001", "local"):
        assert unreachable(address, window_s=0) is None
