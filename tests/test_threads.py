"""The threads a session gets when none are asked for: $MODELBAKE_THREADS, else the CPUs this process is
granted when fewer than the machine has (an affinity mask, a cgroup CPU quota), else the engine's default.

The cgroup files are written into a scratch folder and the machine's counts are faked, so nothing here
depends on the machine that runs it; tests/test_docker_e2e.py reads a real quota (docker run --cpus).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from modelbake.runtime import sessions


def _cgroups(root: Path, files: dict[str, str], proc: str) -> tuple[Path, Path]:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "proc-cgroup").write_text(proc)
    return root / "fs", root / "proc-cgroup"


@pytest.mark.parametrize(
    ("files", "proc", "quota"),
    [
        pytest.param({"fs/cpu.max": "150000 100000\n"}, "0::/\n", 1.5, id="v2, a container's own cgroup as root"),
        pytest.param({"fs/cpu.max": "max 100000\n"}, "0::/\n", None, id="v2 without a limit"),
        pytest.param(
            {"fs/kubepods/pod1/cpu.max": "400000 100000", "fs/kubepods/pod1/c1/cpu.max": "max 100000"},
            "0::/kubepods/pod1/c1\n",
            4.0,
            id="v2, the pod's limit above the container's cgroup",
        ),
        pytest.param(
            {"fs/a/cpu.max": "100000 100000", "fs/a/b/cpu.max": "300000 100000"}, "0::/a/b\n", 1.0, id="v2, the lowest"
        ),
        pytest.param({"fs/cpu.max": "200000 100000"}, "0::/docker/abc\n", 2.0, id="v2, the named path not mounted"),
        pytest.param(
            {"fs/cpu,cpuacct/cpu.cfs_quota_us": "50000", "fs/cpu,cpuacct/cpu.cfs_period_us": "100000"},
            "4:memory:/x\n3:cpu,cpuacct:/\n0::/\n",
            0.5,
            id="v1",
        ),
        pytest.param(
            {"fs/cpu/cpu.cfs_quota_us": "-1", "fs/cpu/cpu.cfs_period_us": "100000"}, "1:cpu:/\n", None, id="v1 unset"
        ),
        pytest.param({"fs/cpu.max": "garbage"}, "0::/\nnot a cgroup line\n", None, id="unreadable"),
    ],
)
def test_the_cgroup_quota_is_read_from_the_files_the_kernel_writes(
    tmp_path: Path, files: dict[str, str], proc: str, quota: float | None
) -> None:
    root, proc_cgroup = _cgroups(tmp_path, files, proc)
    root.mkdir(exist_ok=True)
    assert sessions.cgroup_cpu_quota(root, proc_cgroup) == quota


def test_no_cgroup_file_at_all_is_no_limit(tmp_path: Path) -> None:
    assert sessions.cgroup_cpu_quota(tmp_path, tmp_path / "absent") is None


@pytest.mark.parametrize(
    ("affinity", "quota", "granted"),
    [
        (8, None, None),  # the whole machine: the engine's default stands
        (8, "250000 100000", 3),  # a quota of 2.5 CPUs: 3 threads
        (8, "800000 100000", None),  # a quota as large as the machine
        (2, None, 2),  # pinned to 2 of the 8 (docker --cpuset-cpus)
        (4, "100000 100000", 1),  # both: the lower
        (8, "10000 100000", 1),  # a tenth of a CPU is still a thread
    ],
)
def test_the_cpus_granted_are_the_lower_of_affinity_and_quota(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, affinity: int, quota: str | None, granted: int | None
) -> None:
    monkeypatch.setattr(sessions.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(sessions.os, "sched_getaffinity", lambda _: set(range(affinity)), raising=False)
    root, proc_cgroup = _cgroups(tmp_path, {"fs/cpu.max": quota} if quota else {}, "0::/\n")
    assert sessions.cpus_granted(root, proc_cgroup) == granted


def test_modelbake_threads_comes_before_the_cpus_granted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sessions, "cpus_granted", lambda: 3)
    monkeypatch.delenv(sessions.THREADS_ENV, raising=False)
    assert sessions.default_threads() == 3
    monkeypatch.setenv(sessions.THREADS_ENV, "5")
    assert sessions.default_threads() == 5
