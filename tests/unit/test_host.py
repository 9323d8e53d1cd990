"""Reading /proc/PID/mountinfo: mount points (escaped as the kernel writes them) and types."""

from __future__ import annotations

from pathlib import Path

from prefect_gpu_sandbox.host import mount_points

MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw
35 22 0:30 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 22 0:31 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
90 22 0:50 / /srv/my\\040node/kubelet/pods/x/volumes rw - tmpfs tmpfs rw
91 22 0:51 / /srv/node/rootfs rw shared:7 master:2 - overlay overlay rw,lowerdir=/a
"""


def test_mount_points_and_types() -> None:
    assert mount_points(MOUNTINFO) == [
        (Path("/"), "ext4"),
        (Path("/sys/fs/cgroup/memory"), "cgroup"),
        (Path("/sys/fs/cgroup/unified"), "cgroup2"),
        (Path("/srv/my node/kubelet/pods/x/volumes"), "tmpfs"),
        (Path("/srv/node/rootfs"), "overlay"),
    ]
