"""A fake machine for the pool's reading tests: what /proc and /sys say, in ``tmp_path``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

MiB = 1024 * 1024
GiB = 1024 * MiB
HOST_MEM = 16 * GiB
V1_UNLIMITED = "9223372036854771712"


@dataclass
class Tree:
    """A fake machine: what /proc and /sys say. Cgroup files are {relative dir: {file: text}}
    under the cgroup mount point."""

    online: str = "0-7"
    affinity: str | None = "0-7"
    memtotal_kb: int = HOST_MEM // 1024
    memavail_kb: int = 12 * GiB // 1024
    osrelease: str = "6.8.0-45-generic"
    version: int | None = None  # cgroup version: None = no cgroup mounts
    own: str = "/user.slice/session-1.scope"  # our path in /proc/self/cgroup
    mount_root: str = "/"  # the mount's root (mountinfo field 4)
    files: dict[str, dict[str, str]] = field(default_factory=dict)
    markers: tuple[str, ...] = ()  # e.g. ".dockerenv"
    dmi: dict[str, str] = field(default_factory=dict)
    #: Other processes' cgroup paths: /proc/<pid>/cgroup as /proc/self/cgroup, with this path.
    pids: dict[int, str] = field(default_factory=dict)

    def build(self, root: Path) -> Path:
        def put(rel: str, text: str) -> None:
            p = root / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)

        put("sys/devices/system/cpu/online", self.online + "\n")
        status = "Name:\tpython\n"
        if self.affinity is not None:
            status += f"Cpus_allowed:\tff\nCpus_allowed_list:\t{self.affinity}\n"
        put("proc/self/status", status)
        put(
            "proc/meminfo",
            f"MemTotal:       {self.memtotal_kb} kB\nMemFree:  1000 kB\n"
            f"MemAvailable:   {self.memavail_kb} kB\n",
        )
        put("proc/sys/kernel/osrelease", self.osrelease + "\n")
        mountinfo = ["22 1 259:2 / / rw,relatime - ext4 /dev/root rw"]
        for pid, path in self.pids.items():
            put(f"proc/{pid}/cgroup", self._cgroup_file(path))
        put("proc/self/cgroup", self._cgroup_file(self.own))
        if self.version == 2:
            mountinfo.append(
                f"30 22 0:26 {self.mount_root} /sys/fs/cgroup rw,nosuid - cgroup2 "
                "cgroup2 rw,nsdelegate"
            )
            base = "sys/fs/cgroup"
        elif self.version == 1:
            mountinfo.append(
                f"33 31 0:29 {self.mount_root} /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory"
            )
            mountinfo.append(
                f"34 31 0:30 {self.mount_root} /sys/fs/cgroup/cpu,cpuacct rw - "
                "cgroup cgroup rw,cpu,cpuacct"
            )
            base = "sys/fs/cgroup"
        else:
            base = "sys/fs/cgroup"
        put("proc/self/mountinfo", "\n".join(mountinfo) + "\n")
        for rel_dir, entries in self.files.items():
            for name, text in entries.items():
                put(f"{base}/{rel_dir.strip('/')}/{name}".replace("//", "/"), text + "\n")
        for marker in self.markers:
            put(marker, "")
        for name, text in self.dmi.items():
            put(f"sys/class/dmi/id/{name}", text + "\n")
        return root

    def _cgroup_file(self, path: str) -> str:
        if self.version == 2:
            return f"0::{path}\n"
        if self.version == 1:
            return f"5:memory:{path}\n3:cpu,cpuacct:{path}\n1:name=systemd:{path}\n0::/\n"
        return "0::/\n"


OWN = "user.slice/session-1.scope"
