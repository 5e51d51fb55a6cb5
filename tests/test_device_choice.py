"""Device selection: parsing, detection from fake facts, the pure decision, the ORT clash."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from embedpool.device_choice import (
    ORT_DISTRIBUTIONS,
    DeviceFacts,
    DeviceRequest,
    Gpu,
    decide_device,
    detect_facts,
    installed_ort_distributions,
    ort_clash,
    parse_device,
    parse_nvidia_smi,
    resolve_device,
    visible_gpus,
)
from embedpool.errors import ConfigError, DeviceError

GiB = 1024**3
MiB = 1024**2
H200 = Gpu(0, "NVIDIA H200", 143771 * MiB, 142000 * MiB, "GPU-aaaa-1111", 0)
A10 = Gpu(1, "NVIDIA A10", 23028 * MiB, 22000 * MiB, "GPU-bbbb-2222", 1)
CPU_ORT = (("onnxruntime", "1.32.0"),)
GPU_ORT = (("onnxruntime-gpu", "1.32.0"),)
BOTH_ORT = (("onnxruntime", "1.32.0"), ("onnxruntime-gpu", "1.32.0"))


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("auto", DeviceRequest("auto")),
        (None, DeviceRequest("auto")),
        ("cpu", DeviceRequest("cpu")),
        ("CUDA", DeviceRequest("cuda")),
        ("gpu", DeviceRequest("cuda")),
        ("cuda:0", DeviceRequest("cuda", 0)),
        (" cuda:3 ", DeviceRequest("cuda", 3)),
        ("gpu:1", DeviceRequest("cuda", 1)),
    ],
)
def test_parse_device(text: str | None, want: DeviceRequest) -> None:
    assert parse_device(text) == want
    assert parse_device(str(want)) == want  # str() round-trips


@pytest.mark.parametrize("text", ["tpu", "cuda:", "cuda:-1", "cuda:x", "cuda0", "mps", ""])
def test_parse_device_refuses_with_the_choices(text: str) -> None:
    with pytest.raises(ConfigError, match="auto, cpu, cuda, cuda:N"):
        parse_device(text)


def test_parse_nvidia_smi_reads_every_gpu_and_the_driver() -> None:
    text = (
        "0, NVIDIA H200, GPU-aaaa-1111, 143771, 142000, 570.86.15\n"
        "1, NVIDIA A10, GPU-bbbb-2222, 23028, [N/A], 570.86.15\n"
        "garbage line\n"
    )
    gpus, driver = parse_nvidia_smi(text)
    assert driver == "570.86.15"
    assert [g.name for g in gpus] == ["NVIDIA H200", "NVIDIA A10"]
    assert gpus[0].memory_total == 143771 * MiB and gpus[0].memory_free == 142000 * MiB
    assert gpus[1].memory_free is None  # [N/A] is unknown, not zero
    assert parse_nvidia_smi("") == ((), None)


@pytest.mark.parametrize(
    ("visible", "want"),
    [
        (None, ["NVIDIA H200", "NVIDIA A10"]),
        ("1", ["NVIDIA A10"]),
        ("1,0", ["NVIDIA A10", "NVIDIA H200"]),  # CUDA numbers them in this order
        ("GPU-bbbb", ["NVIDIA A10"]),  # a unique UUID prefix
        ("0,7,1", ["NVIDIA H200"]),  # CUDA stops at the first bad entry
        ("", []),
        ("-1", []),
        ("0,0", ["NVIDIA H200"]),
    ],
)
def test_visible_gpus_follows_cuda_visible_devices(visible: str | None, want: list[str]) -> None:
    got = visible_gpus((H200, A10), visible)
    assert [g.name for g in got] == want
    assert [g.index for g in got] == list(range(len(want)))  # CUDA ordinals, renumbered


@pytest.mark.parametrize(
    ("dists", "want"),
    [
        ((), None),
        (CPU_ORT, None),
        (GPU_ORT, None),
        (BOTH_ORT, "onnxruntime 1.32.0 and onnxruntime-gpu 1.32.0 are both installed"),
        ((("onnxruntime", "1.32.0"), ("onnxruntime-openvino", "1.20.0")), "onnxruntime-openvino"),
        ((("numpy", "2.0"), ("onnxruntime", "1.32.0")), None),  # other packages are not ORT
    ],
)
def test_ort_clash(dists: tuple[tuple[str, str], ...], want: str | None) -> None:
    msg = ort_clash(dists)
    if want is None:
        assert msg is None
    else:
        assert msg is not None and want in msg
        assert "\n" not in msg  # one line
        assert "pip uninstall -y" in msg  # and the fix


def test_the_clash_is_a_note_of_every_plan_and_part_of_a_cuda_error() -> None:
    for request in ("cpu", "auto"):
        plan = decide_device(parse_device(request), _facts(dists=BOTH_ORT))
        assert len(plan.notes) == 1 and "are both installed" in plan.notes[0]
    with pytest.raises(DeviceError, match=r"also: onnxruntime 1\.32\.0 and onnxruntime-gpu"):
        decide_device(parse_device("cuda"), _facts(dists=BOTH_ORT, gpus=()))
    assert decide_device(parse_device("auto"), _facts()).notes == ()


def test_ort_clash_fix_keeps_the_gpu_package() -> None:
    msg = ort_clash(BOTH_ORT)
    assert msg is not None
    assert msg.endswith("pip install onnxruntime-gpu (scripts/setup gpu does this)")


def _facts(
    dists: tuple[tuple[str, str], ...] = GPU_ORT,
    driver: str | None = "570.86",
    gpus: tuple[Gpu, ...] = (H200,),
    all_gpus: int | None = None,
    visible: str | None = None,
) -> DeviceFacts:
    return DeviceFacts(
        distributions=dists,
        driver=driver,
        driver_source="nvidia-smi",
        gpus=gpus,
        all_gpus=len(gpus) if all_gpus is None else all_gpus,
        cuda_visible_devices=visible,
    )


# request, facts -> kind, devices (or the error's `missing` and a phrase of its message)
DECISIONS: list[tuple[str, DeviceFacts, str, tuple[str, ...] | str]] = [
    ("cpu", _facts(), "cpu", ("cpu",)),
    ("auto", _facts(), "cuda", ("cuda:0",)),
    ("auto", _facts(gpus=(H200, A10)), "cuda", ("cuda:0", "cuda:1")),
    ("auto", _facts(dists=CPU_ORT), "cpu", ("cpu",)),
    ("auto", _facts(dists=BOTH_ORT), "cuda", ("cuda:0",)),  # the worker confirms the provider
    ("auto", _facts(driver=None, gpus=()), "cpu", ("cpu",)),
    ("auto", _facts(gpus=()), "cpu", ("cpu",)),
    ("cuda", _facts(), "cuda", ("cuda:0",)),
    ("cuda", _facts(gpus=(H200, A10)), "cuda", ("cuda:0", "cuda:1")),
    ("cuda:1", _facts(gpus=(H200, A10)), "cuda", ("cuda:1",)),
    ("cuda", _facts(dists=CPU_ORT), "package", "the CPU package onnxruntime 1.32.0 is"),
    ("cuda", _facts(dists=()), "package", "no onnxruntime is"),
    ("cuda", _facts(driver=None, gpus=()), "driver", "no NVIDIA driver"),
    ("cuda", _facts(gpus=()), "device", "sees no GPU"),
    ("cuda", _facts(gpus=(), all_gpus=2, visible=""), "device", "CUDA_VISIBLE_DEVICES=''"),
    ("cuda:1", _facts(), "device", "GPU index 1 is out of range: 1 GPU(s) visible (cuda:0)"),
    ("cuda:4", _facts(gpus=(H200, A10)), "device", "(cuda:0..cuda:1)"),
]


@pytest.mark.parametrize(("request_text", "facts", "kind", "want"), DECISIONS)
def test_decide_device(
    request_text: str, facts: DeviceFacts, kind: str, want: tuple[str, ...] | str
) -> None:
    request = parse_device(request_text)
    if isinstance(want, str):
        with pytest.raises(DeviceError) as info:
            decide_device(request, facts)
        assert info.value.missing == kind
        assert want in str(info.value)
        assert str(info.value).startswith(f"--device {request_text}: ")
        return
    plan = decide_device(request, facts)
    assert plan.kind == kind
    assert plan.devices == want
    assert plan.reason  # doctor and the summary always say why


def test_auto_on_cpu_says_why_in_one_line() -> None:
    plan = decide_device(DeviceRequest("auto"), _facts(dists=CPU_ORT))
    assert plan.describe() == "cpu (auto: onnxruntime-gpu not installed)"
    assert (
        decide_device(DeviceRequest("auto"), _facts(driver=None, gpus=())).describe()
        == "cpu (auto: no NVIDIA driver)"
    )
    plan = decide_device(DeviceRequest("auto"), _facts(gpus=(H200, A10)))
    assert plan.describe() == (
        "cuda:0 NVIDIA H200, cuda:1 NVIDIA A10 (auto: onnxruntime-gpu and a GPU are present)"
    )


class _Smi:
    """A stand-in for running nvidia-smi: records its calls, answers ``text``."""

    def __init__(self, text: str | None) -> None:
        self.text = text
        self.calls: list[Sequence[str]] = []

    def __call__(self, args: Sequence[str]) -> str | None:
        self.calls.append(args)
        return self.text


def test_detect_does_not_probe_gpus_for_auto_without_the_gpu_package(tmp_path: Path) -> None:
    smi = _Smi("0, NVIDIA H200, GPU-a, 143771, 142000, 570.86\n")
    facts = detect_facts(
        DeviceRequest("auto"), run=smi, root=tmp_path, environ={}, distributions=CPU_ORT
    )
    assert smi.calls == []
    assert not facts.gpus_probed
    facts = detect_facts(
        DeviceRequest("cuda"), run=smi, root=tmp_path, environ={}, distributions=CPU_ORT
    )
    assert len(smi.calls) == 1 and facts.gpus[0].name == "NVIDIA H200"  # to name what is missing


def test_detect_applies_cuda_visible_devices(tmp_path: Path) -> None:
    smi = _Smi(
        "0, NVIDIA H200, GPU-a, 143771, 142000, 570.86\n"
        "1, NVIDIA A10, GPU-b, 23028, 22000, 570.86\n"
    )
    facts = detect_facts(
        DeviceRequest("auto"),
        run=smi,
        root=tmp_path,
        environ={"CUDA_VISIBLE_DEVICES": "1"},
        distributions=GPU_ORT,
    )
    assert [(g.index, g.smi_index, g.name) for g in facts.gpus] == [(0, 1, "NVIDIA A10")]
    assert facts.all_gpus == 2 and facts.driver == "570.86"


def test_detect_reads_proc_driver_nvidia_without_nvidia_smi(tmp_path: Path) -> None:
    proc = tmp_path / "proc/driver/nvidia"
    (proc / "gpus/0000:01:00.0").mkdir(parents=True)
    (proc / "version").write_text(
        "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.14  "
        "Thu Feb 22 01:44:30 UTC 2024\nGCC version:  gcc 12\n"
    )
    facts = detect_facts(
        DeviceRequest("cuda"), run=_Smi(None), root=tmp_path, environ={}, distributions=GPU_ORT
    )
    assert facts.driver == "550.54.14" and facts.driver_source == "/proc/driver/nvidia/version"
    assert len(facts.gpus) == 1 and facts.gpus[0].memory_free is None
    assert any("nvidia-smi not found" in n for n in facts.notes)
    assert decide_device(DeviceRequest("cuda"), facts).kind == "cuda"


def test_detect_finds_wsl2_libcuda_without_nvidia_smi(tmp_path: Path) -> None:
    lib = tmp_path / "usr/lib/wsl/lib/libcuda.so.1"
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"")
    facts = detect_facts(
        DeviceRequest("cuda"), run=_Smi(None), root=tmp_path, environ={}, distributions=GPU_ORT
    )
    assert facts.driver_source == "/usr/lib/wsl/lib/libcuda.so.1" and len(facts.gpus) == 1


def test_detect_nothing_names_the_driver(tmp_path: Path) -> None:
    facts = detect_facts(
        DeviceRequest("cuda"), run=_Smi(None), root=tmp_path, environ={}, distributions=GPU_ORT
    )
    with pytest.raises(DeviceError) as info:
        decide_device(DeviceRequest("cuda"), facts)
    assert info.value.missing == "driver"


def test_this_machine() -> None:
    """The real detection here: CI has neither onnxruntime-gpu nor a GPU, so auto is the CPU
    and an explicit cuda names the package (the first thing missing)."""
    dists = installed_ort_distributions()
    assert dists and {n for n, _ in dists} <= set(ORT_DISTRIBUTIONS)  # read from metadata
    assert resolve_device("cpu").devices == ("cpu",)
    if any(n == "onnxruntime-gpu" for n, _ in dists):  # pragma: no cover - a GPU machine
        return
    assert resolve_device("auto").kind == "cpu"
    with pytest.raises(DeviceError) as info:
        resolve_device("cuda")
    assert info.value.missing == "package"
    assert "onnxruntime-gpu is not installed (the CPU package onnxruntime" in str(info.value)
