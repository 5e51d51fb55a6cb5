"""Which device runs the model: what is installed and present, and the decision from that.
(Named for the choice: the executor that runs one pool per chosen GPU is
``executors/devices.py``.)

::

    --device auto|cpu|cuda[:N] ──parse_device──> DeviceRequest ─┐
    package metadata (importlib.metadata) ──┐                    ├─ decide_device (pure) ──>
    nvidia-smi --query-gpu / /proc/driver ──┴─ detect_facts ──> DeviceFacts     DevicePlan | DeviceError
                                                                     └─ the worker confirms: ORT's
                                                                        CUDAExecutionProvider loads
                                                                        (engine.py, cuda_ep.py)

Detection is cheap and imports no ONNX Runtime in the parent (a pool's parent never runs the
model, and importing ORT costs it ~20 MB): the installed distributions come from package
metadata, the GPUs from one ``nvidia-smi --query-gpu`` call (or ``/proc/driver/nvidia`` when
nvidia-smi is missing), and ``nvidia-smi`` is not even run when onnxruntime-gpu is not
installed and the request is ``auto`` (the common CPU-only machine pays one metadata read).
Whether the CUDA provider really loads (CUDA and cuDNN libraries of the right major version)
only a process that imports ORT can tell: the worker checks it when it builds its session and
fails its start with ``DeviceUnavailable``, which ``auto`` answers by running on the CPU.

``auto`` picks CUDA when onnxruntime-gpu and a visible GPU are both present, else the CPU,
quietly (the plan's ``reason`` says why, for ``doctor`` and the job summary). An explicit
``cuda`` without them fails at once with a ``DeviceError`` naming what is missing: the
package, the driver or the device.

onnxruntime and onnxruntime-gpu install the same ``onnxruntime`` module: with both installed,
whichever was installed last overwrote the other's files, and uninstalling either breaks the
module. ``ort_clash`` names both and the fix.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from embedpool.errors import ConfigError, DeviceError, DeviceMissing

DeviceKind = Literal["cpu", "cuda"]
RequestKind = Literal["auto", "cpu", "cuda"]
Missing = DeviceMissing

#: Distributions that install the ``onnxruntime`` module (each a build of the same package).
ORT_DISTRIBUTIONS = (
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-openvino",
    "onnxruntime-directml",
    "onnxruntime-training",
    "onnxruntime-qnn",
    "ort-nightly",
    "ort-nightly-gpu",
)
#: The distribution whose wheels carry the CUDA execution provider on Linux and Windows.
ORT_GPU = "onnxruntime-gpu"
#: How long nvidia-smi may take. It answers in ~0.1-0.5 s; a hung driver must not hang us.
NVIDIA_SMI_TIMEOUT_S = 10.0
#: The fix printed for a clash or a missing GPU package (scripts/setup gpu runs the same).
GPU_INSTALL_FIX = "pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'embedpool[gpu]'"


@dataclass(frozen=True)
class DeviceRequest:
    """What the user asked for: ``auto``, ``cpu``, ``cuda`` (every visible GPU) or ``cuda:N``."""

    kind: RequestKind
    index: int | None = None

    def __str__(self) -> str:
        return f"cuda:{self.index}" if self.index is not None else self.kind


def parse_device(text: str | DeviceRequest | None) -> DeviceRequest:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' (also 'gpu', an alias of cuda) -> DeviceRequest."""
    if isinstance(text, DeviceRequest):
        return text
    raw = "auto" if text is None else str(text).strip().lower()
    if raw in ("auto", "cpu"):
        return DeviceRequest(raw)  # type: ignore[arg-type]
    if raw in ("cuda", "gpu"):
        return DeviceRequest("cuda")
    m = re.fullmatch(r"(?:cuda|gpu):(\d+)", raw)
    if m:
        return DeviceRequest("cuda", int(m.group(1)))
    raise ConfigError(f"device {text!r} is not one of auto, cpu, cuda, cuda:N (N a GPU index)")


@dataclass(frozen=True)
class Gpu:
    """One GPU as this process's CUDA sees it. ``index`` is the CUDA ordinal (what
    ``cuda:N`` and ORT's ``device_id`` mean, after CUDA_VISIBLE_DEVICES); ``smi_index`` is
    nvidia-smi's. Memory in bytes; ``memory_free`` None where it could not be read."""

    index: int
    name: str
    memory_total: int
    memory_free: int | None
    uuid: str = ""
    smi_index: int = 0


@dataclass(frozen=True)
class DeviceFacts:
    """What detection found. Every field is plain data, so ``decide_device`` is a pure
    function and tests build facts by hand."""

    #: (name, version) of every installed distribution that provides ``onnxruntime``.
    distributions: tuple[tuple[str, str], ...] = ()
    #: The NVIDIA driver's version; None: no driver found.
    driver: str | None = None
    #: Where the driver was seen: "nvidia-smi", "/proc/driver/nvidia/version", a libcuda path.
    driver_source: str = ""
    #: GPUs visible to CUDA in this process (CUDA_VISIBLE_DEVICES applied), CUDA order.
    gpus: tuple[Gpu, ...] = ()
    #: GPUs the driver has, before CUDA_VISIBLE_DEVICES (for doctor and error messages).
    all_gpus: int = 0
    #: False when the GPUs were not looked for (auto without onnxruntime-gpu: no need).
    gpus_probed: bool = True
    cuda_visible_devices: str | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def gpu_package(self) -> bool:
        return any(name == ORT_GPU for name, _ in self.distributions)


@dataclass(frozen=True)
class DevicePlan:
    """Where the model runs: the device kind, the GPUs (CUDA ordinals) and why."""

    kind: DeviceKind
    gpus: tuple[Gpu, ...]
    reason: str
    request: DeviceRequest = DeviceRequest("auto")
    #: Lines to show the user once (the ORT clash, detection remarks).
    notes: tuple[str, ...] = ()

    @classmethod
    def for_recipe(cls, engine: object, device: str | DeviceRequest) -> DevicePlan | None:
        """The plan of a custom engine recipe (tests, ``Embedder(engine=...)``): it runs where
        it says, on the CPU's plan, with no device detection; None for the model's own."""
        if engine is None:
            return None
        return cls("cpu", (), "a custom engine", parse_device(device))

    @property
    def devices(self) -> tuple[str, ...]:
        """ORT device names of the plan: ("cpu",) or ("cuda:0", "cuda:1", ...)."""
        return ("cpu",) if self.kind == "cpu" else tuple(f"cuda:{g.index}" for g in self.gpus)

    def describe(self) -> str:
        """One line for the job summary, bench and doctor."""
        if self.kind == "cpu":
            return f"cpu ({self.reason})"
        names = ", ".join(f"cuda:{g.index} {g.name}" for g in self.gpus)
        return f"{names} ({self.reason})"


# --- the ONNX Runtime packages --------------------------------------------------------------


def ort_clash(distributions: Iterable[tuple[str, str]]) -> str | None:
    """One line naming every distribution that installs the ``onnxruntime`` module, and the
    fix, when there is more than one; None when there is at most one."""
    found = [(n, v) for n, v in distributions if n in ORT_DISTRIBUTIONS]
    if len(found) < 2:
        return None
    names = " and ".join(f"{n} {v}" for n, v in found)
    gpu = any(n == ORT_GPU for n, _ in found)
    others = " ".join(n for n, _ in found)
    fix = (
        f"pip uninstall -y {others} && pip install {ORT_GPU}"
        if gpu
        else f"pip uninstall -y {others} && pip install onnxruntime"
    )
    return (
        f"{names} are both installed and share the onnxruntime module (the one installed "
        f"last overwrote the other's files; uninstalling either breaks it); fix: {fix}"
        + (" (scripts/setup gpu does this)" if gpu else "")
    )


def installed_ort_distributions() -> tuple[tuple[str, str], ...]:
    """(name, version) of the installed distributions that provide ``onnxruntime``, read from
    package metadata (onnxruntime itself is not imported)."""
    from importlib import metadata

    found: list[tuple[str, str]] = []
    for name in ORT_DISTRIBUTIONS:
        try:
            found.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            continue
    return tuple(found)


# --- the GPUs ---------------------------------------------------------------------------------

#: The one nvidia-smi query: CSV, no header, memory in MiB.
NVIDIA_SMI_QUERY = "index,name,uuid,memory.total,memory.free,driver_version"


def parse_nvidia_smi(text: str) -> tuple[tuple[Gpu, ...], str | None]:
    """``nvidia-smi --query-gpu=index,name,uuid,memory.total,memory.free,driver_version
    --format=csv,noheader,nounits`` -> (GPUs in nvidia-smi order, driver version). A field
    nvidia-smi cannot read ("[N/A]", "[Not Supported]", as on some WSL2 and MIG setups) is
    None (memory) or kept as text. Lines that do not parse are skipped."""
    gpus: list[Gpu] = []
    driver: str | None = None
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 6 or not parts[0].isdigit():
            continue
        idx, name, uuid, total, free, drv = parts
        gpus.append(
            Gpu(
                index=int(idx),
                name=name,
                memory_total=_mib(total) or 0,
                memory_free=_mib(free),
                uuid=uuid,
                smi_index=int(idx),
            )
        )
        driver = driver or (drv if drv and not drv.startswith("[") else None)
    return tuple(gpus), driver


def _mib(field_text: str) -> int | None:
    try:
        return int(float(field_text)) * 1024 * 1024
    except ValueError:
        return None


def visible_gpus(gpus: Sequence[Gpu], cuda_visible_devices: str | None) -> tuple[Gpu, ...]:
    """The GPUs CUDA shows this process, renumbered as CUDA numbers them.

    CUDA_VISIBLE_DEVICES unset: all of them. Otherwise a comma list of nvidia-smi indices or
    UUIDs (full or a unique prefix, "GPU-..."), in the order CUDA will number them; CUDA stops
    at the first entry that matches no GPU, and an empty value or "-1" hides every GPU."""
    if cuda_visible_devices is None:
        return tuple(gpus)
    out: list[Gpu] = []
    for entry in (e.strip() for e in cuda_visible_devices.split(",")):
        match = _match_gpu(gpus, entry)
        if match is None or match in out:
            break  # CUDA ignores this entry and every one after it
        out.append(match)
    return tuple(
        Gpu(
            index=i,
            name=g.name,
            memory_total=g.memory_total,
            memory_free=g.memory_free,
            uuid=g.uuid,
            smi_index=g.smi_index,
        )
        for i, g in enumerate(out)
    )


def _match_gpu(gpus: Sequence[Gpu], entry: str) -> Gpu | None:
    if entry.isdigit():
        return next((g for g in gpus if g.smi_index == int(entry)), None)
    if entry.upper().startswith(("GPU-", "MIG-")):
        hits = [g for g in gpus if g.uuid.upper().startswith(entry.upper())]
        return hits[0] if len(hits) == 1 else None
    return None


Runner = Callable[[Sequence[str]], str | None]


def run_nvidia_smi(args: Sequence[str]) -> str | None:
    """stdout of ``nvidia-smi ARGS``, or None when it is missing, fails or times out."""
    exe = shutil.which("nvidia-smi") or next(
        (p for p in ("/usr/lib/wsl/lib/nvidia-smi", "/usr/bin/nvidia-smi") if os.path.exists(p)),
        None,
    )
    if exe is None:
        return None
    try:
        proc = subprocess.run(
            [exe, *args], capture_output=True, text=True, check=False, timeout=NVIDIA_SMI_TIMEOUT_S
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def _proc_driver(root: Path) -> tuple[str | None, int]:
    """(driver version, GPU count) from /proc/driver/nvidia (native Linux; absent in WSL2)."""
    try:
        text = (root / "proc/driver/nvidia/version").read_text()
    except OSError:
        return None, 0
    m = re.search(r"Kernel Module\s+(?:for\s+\S+\s+)?([0-9][0-9.]*)", text)
    try:
        count = len(list((root / "proc/driver/nvidia/gpus").iterdir()))
    except OSError:
        count = 0
    return (m.group(1) if m else "unknown"), count


#: Where the driver's libcuda lives when nothing else says so (WSL2 maps the Windows driver
#: there; the others are the usual Linux locations).
LIBCUDA_PATHS = (
    "usr/lib/wsl/lib/libcuda.so.1",
    "usr/lib/x86_64-linux-gnu/libcuda.so.1",
    "usr/lib64/libcuda.so.1",
    "usr/lib/aarch64-linux-gnu/libcuda.so.1",
)


def _libcuda(root: Path) -> str | None:
    """The path of the driver's libcuda.so.1, if one of the usual places has it (the file is
    only looked at: loading it would initialise CUDA in this process)."""
    return next(("/" + p for p in LIBCUDA_PATHS if (root / p).exists()), None)


def detect_facts(
    request: DeviceRequest | None = None,
    *,
    run: Runner = run_nvidia_smi,
    root: Path = Path("/"),
    environ: Mapping[str, str] | None = None,
    distributions: Sequence[tuple[str, str]] | None = None,
) -> DeviceFacts:
    """Read what is installed and present. With ``request`` ``auto`` or ``cpu`` and no
    onnxruntime-gpu installed, the GPUs are not probed (``gpus_probed`` False): nothing
    could use them. ``run``, ``root``, ``environ`` and ``distributions`` are for tests."""
    env = os.environ if environ is None else environ
    dists = tuple(distributions) if distributions is not None else installed_ort_distributions()
    visible = env.get("CUDA_VISIBLE_DEVICES")
    gpu_package = any(n == ORT_GPU for n, _ in dists)
    if request is not None and request.kind != "cuda" and not gpu_package:
        return DeviceFacts(distributions=dists, gpus_probed=False, cuda_visible_devices=visible)
    notes: list[str] = []
    out = run(["--query-gpu=" + NVIDIA_SMI_QUERY, "--format=csv,noheader,nounits"])
    gpus: tuple[Gpu, ...] = ()
    driver: str | None = None
    source = ""
    if out is not None:
        gpus, driver = parse_nvidia_smi(out)
        source = "nvidia-smi"
        if driver is None and gpus:
            driver = "unknown"
    if driver is None:
        proc_driver, count = _proc_driver(root)
        libcuda = _libcuda(root)
        if proc_driver is not None:
            driver, source = proc_driver, "/proc/driver/nvidia/version"
        elif libcuda is not None:  # WSL2 without nvidia-smi on PATH: the driver's library
            driver, source, count = "unknown", libcuda, 1
        if driver is not None and count and not gpus:
            # nvidia-smi is missing: the GPUs exist but their memory is unknown
            gpus = tuple(
                Gpu(
                    index=i,
                    name="NVIDIA GPU (nvidia-smi missing)",
                    memory_total=0,
                    memory_free=None,
                    smi_index=i,
                )
                for i in range(count)
            )
            notes.append(
                "nvidia-smi not found: GPU memory unknown, the token budget falls "
                "back to its default"
            )
    return DeviceFacts(
        distributions=dists,
        driver=driver,
        driver_source=source,
        gpus=visible_gpus(gpus, visible),
        all_gpus=len(gpus),
        cuda_visible_devices=visible,
        notes=tuple(notes),
    )


# --- the decision -----------------------------------------------------------------------------


def decide_device(request: DeviceRequest, facts: DeviceFacts) -> DevicePlan:
    """The device plan for ``request`` given ``facts`` (pure; table-tested).

    cpu: the CPU. auto: CUDA on every visible GPU when onnxruntime-gpu and a GPU are both
    there, else the CPU, with the reason. cuda / cuda:N: those GPUs, or ``DeviceError``
    naming what is missing (the package, the driver, the device)."""
    clash = ort_clash(facts.distributions)
    notes = ((clash,) if clash else ()) + facts.notes
    if request.kind == "cpu":
        return DevicePlan("cpu", (), "requested", request, notes)
    missing = _missing(request, facts)
    if missing is not None:
        what, message = missing
        if request.kind == "cuda":
            raise DeviceError(
                f"--device {request}: {message}" + (f"; also: {clash}" if clash else ""), what
            )
        return DevicePlan("cpu", (), f"auto: {_AUTO_CPU_REASON[what]}", request, notes)
    gpus = facts.gpus if request.index is None else (facts.gpus[request.index],)
    why = "requested" if request.kind == "cuda" else f"auto: {ORT_GPU} and a GPU are present"
    return DevicePlan("cuda", gpus, why, request, notes)


#: auto's quiet reason for the CPU, in the summary and the doctor (cuda gets the whole story).
_AUTO_CPU_REASON: dict[Missing, str] = {
    "package": f"{ORT_GPU} not installed",
    "driver": "no NVIDIA driver",
    "device": "no GPU visible",
}


def _missing(request: DeviceRequest, facts: DeviceFacts) -> tuple[Missing, str] | None:
    """What stands between the request and a GPU, or None."""
    if not facts.gpu_package:
        cpu = next((f"{n} {v}" for n, v in facts.distributions if n != ORT_GPU), None)
        have = f"the CPU package {cpu} is" if cpu else "no onnxruntime is"
        return "package", (
            f"{ORT_GPU} is not installed ({have}); install it with: {GPU_INSTALL_FIX}"
        )
    if facts.driver is None:
        if not facts.gpus_probed:
            return "driver", "GPUs not probed"
        return "driver", (
            "no NVIDIA driver found (nvidia-smi and /proc/driver/nvidia are "
            "absent, so libcuda is not there either); install the NVIDIA driver "
            "(on WSL2, the Windows driver provides it)"
        )
    if not facts.gpus:
        hidden = (
            f" (CUDA_VISIBLE_DEVICES={facts.cuda_visible_devices!r} hides all {facts.all_gpus})"
            if facts.all_gpus and facts.cuda_visible_devices is not None
            else ""
        )
        return "device", f"the NVIDIA driver {facts.driver} sees no GPU{hidden}"
    if request.index is not None and request.index >= len(facts.gpus):
        return "device", (
            f"GPU index {request.index} is out of range: "
            f"{len(facts.gpus)} GPU(s) visible (cuda:0"
            f"{f'..cuda:{len(facts.gpus) - 1}' if len(facts.gpus) > 1 else ''})"
        )
    return None


def resolve_device(device: str | DeviceRequest | None = "auto") -> DevicePlan:
    """Parse, detect and decide: the one call the CLI and the library make."""
    request = parse_device(device)
    if request.kind == "cpu":  # the clash check still runs: it reads package metadata only
        return decide_device(request, DeviceFacts(installed_ort_distributions(), gpus_probed=False))
    return decide_device(request, detect_facts(request))
