"""``hotweights doctor`` on faked nodes: every check reads its files under a root prefix and its
commands, limits and the daemon through functions, so each provisioning pitfall is one small node."""

from __future__ import annotations

import json
import resource
from pathlib import Path
from types import SimpleNamespace

import pytest

from hotweights import errors
from hotweights.tools.doctor import FAIL, OK, WARN, Check, System, checks, parse_stripe

GPU = "0000:18:00.0"
DEFAULT_STRIPES = "stripe_count:  1 stripe_size:   1048576 pattern:       raid0 stripe_offset: -1\n"
WIDE_FILE = """/lustre/models/llama/model-00001.safetensors
lmm_stripe_count:  -1
lmm_stripe_size:   16777216
lmm_pattern:       raid0
lmm_layout_gen:    0
lmm_stripe_offset: 3
\tobdidx\t\t objid\t\t objid\t\t group
\t     3\t         12345\t      0x3039\t             0
"""


class Node:
    """A fake node: files under ``root``, answers for commands, a limit and a daemon."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.commands: dict[tuple[str, ...], str] = {}
        self.memlock = (2**40, 2**40)
        self.refusal: str | None = None  # what the daemon's --print-config says of the config
        self.asked: list[str | None] = []  # the sockets the daemon check tried
        self.status: object = SimpleNamespace(
            daemon_version="0.1.0",
            pid=4242,
            backend="cuda",
            versions=[],
            socket="/run/hotweights/hotweights.sock",
            gds="",
        )
        self.write("/proc/modules", "nvidia_uvm 1540096 0 - Live 0x0\nnvidia 54353920 2 nvidia_uvm, Live 0x0\n")
        self.write("/proc/driver/nvidia/version", "NVRM version: NVIDIA UNIX x86_64 Kernel Module  560.35.03\n")
        self.write("/proc/self/mountinfo", "22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw\n")
        self.write("/sys/devices/system/node/node0/cpulist", "0-31\n")
        self.gpu(GPU, 0)

    def write(self, path: str, text: str) -> None:
        p = self.root / path.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)

    def gpu(self, address: str, numa: int) -> None:
        base = f"/sys/bus/pci/devices/{address}"
        self.write(base + "/vendor", "0x10de\n")
        self.write(base + "/class", "0x030200\n")
        self.write(base + "/numa_node", f"{numa}\n")

    def daemon(self, socket, origin):
        self.asked.append(socket)
        if isinstance(self.status, Exception):
            raise self.status
        return self.status

    def system(self) -> System:
        return System(
            root=str(self.root),
            env={},
            run=lambda cmd: self.commands.get(tuple(cmd)),
            getrlimit=lambda _r: self.memlock,
            version=lambda pkg: "1.0",
            has_module=lambda _m: True,
            cuda=lambda: (1, None),
            daemon=self.daemon,
            serve_check=lambda path, env: self.refusal,
        )

    def check(self, name: str, **kw) -> Check:
        found = [c for c in checks(system=self.system(), **kw) if c.name == name]
        assert len(found) == 1, [c.name for c in checks(system=self.system(), **kw)]
        return found[0]


@pytest.fixture
def node(tmp_path) -> Node:
    return Node(tmp_path)


def with_nvidia_fs(node: Node) -> None:
    node.write("/proc/modules", "nvidia_fs 262144 0 - Live 0x0\nnvidia 54353920 2 nvidia_fs, Live 0x0\n")
    node.write("/dev/nvidia-fs0", "")


def test_a_healthy_gpu_node_is_all_ok(node):
    with_nvidia_fs(node)
    node.write("/etc/cufile.json", json.dumps({"properties": {"allow_compat_mode": False}}))
    results = checks(system=node.system())
    assert [c for c in results if c.status != OK] == []
    assert {"GPUDirect Storage", "cufile.json", "memlock", "numa", "daemon", "cuda devices"} <= {
        c.name for c in results
    }


def test_no_nvidia_fs_module_warns_with_the_fix(node):
    c = node.check("GPUDirect Storage")
    assert c.status == WARN and "nvidia_fs module not loaded" in c.detail and "bounce path" in c.detail
    assert "modprobe nvidia_fs" in c.fix


def test_nvidia_fs_without_device_nodes_warns(node):
    node.write("/proc/modules", "nvidia_fs 262144 0 - Live 0x0\n")
    c = node.check("GPUDirect Storage")
    assert c.status == WARN and "no /dev/nvidia-fs*" in c.detail and "modprobe" in c.fix


def test_cufile_compat_off_without_nvidia_fs_fails(node):
    # NVIDIA ships cufile.json with // comments and trailing commas; cuFile reads them, so must we.
    node.write(
        "/etc/cufile.json",
        '{\n  // "logging": {},\n  "properties": {\n    "allow_compat_mode": false, // no fallback\n  },\n}\n',
    )
    c = node.check("cufile.json")
    assert c.status == FAIL and "refuses every file" in c.detail
    assert "modprobe nvidia_fs" in c.fix and '"allow_compat_mode": true' in c.fix


def test_cufile_compat_on_with_nvidia_fs_warns_of_the_silent_fallback(node):
    with_nvidia_fs(node)
    node.write("/etc/cufile.json", json.dumps({"properties": {"allow_compat_mode": True}}))
    c = node.check("cufile.json")
    assert c.status == WARN and "silently falls back" in c.detail and "allow_compat_mode" in c.fix


def test_cufile_path_from_the_environment(node):
    with_nvidia_fs(node)
    node.write("/opt/gds/cufile.json", json.dumps({"properties": {"allow_compat_mode": False}}))
    sy = node.system()
    sy.env["CUFILE_ENV_PATH_JSON"] = "/opt/gds/cufile.json"
    c = next(c for c in checks(system=sy) if c.name == "cufile.json")
    assert c.status == OK and "/opt/gds/cufile.json" in c.detail


def lustre_node(node: Node) -> str:
    node.write(
        "/proc/self/mountinfo",
        "22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw\n"
        "90 22 0:55 / /lustre rw,relatime shared:40 - lustre 10.0.0.1@o2ib:/fs rw,flock,lazystatfs\n",
    )
    model = "/lustre/models/llama"
    node.write(model + "/model-00001.safetensors", "")
    return model


def test_lustre_model_directory_with_default_striping_warns(node):
    model = lustre_node(node)
    node.commands[("lfs", "getstripe", "-d", model)] = DEFAULT_STRIPES
    node.commands[("lfs", "getstripe", model + "/model-00001.safetensors")] = DEFAULT_STRIPES.replace(
        "stripe_", "lmm_stripe_"
    )
    node.commands[("lnetctl", "net", "show")] = (
        "net:\n    - net type: o2ib\n      local NI(s):\n        - nid: 10.0.0.5@o2ib\n"
    )
    c = node.check(f"lustre striping {model}", models=[model])
    assert c.status == WARN and "1 OST(s), 1024 KiB stripes" in c.detail and "not striped wide" in c.detail
    assert f"lfs setstripe -c -1 -S 16M {model}" in c.fix and "lfs migrate" in c.fix
    assert node.check(f"storage {model}", models=[model]).status == OK  # lustre: GDS capable, no warning


def test_lustre_striped_over_every_ost_is_ok(node):
    model = lustre_node(node)
    node.commands[("lfs", "getstripe", "-d", model)] = "stripe_count:  -1 stripe_size:   16777216 pattern: raid0\n"
    node.commands[("lfs", "getstripe", model + "/model-00001.safetensors")] = WIDE_FILE
    c = node.check(f"lustre striping {model}", models=[model])
    assert c.status == OK and "all OSTs, 16384 KiB stripes" in c.detail


def test_lustre_without_lfs_warns(node):
    model = lustre_node(node)
    c = node.check(f"lustre striping {model}", models=[model])
    assert c.status == WARN and "striping unknown" in c.detail


def test_lnet_over_tcp_beside_rdma_devices_warns(node):
    model = lustre_node(node)
    node.write("/sys/class/infiniband/efa_0/node_type", "1\n")
    node.write(
        "/proc/sys/lnet/nis", "nid                      status alive refs peer\n0@lo up 0 2 0\n10.0.0.5@tcp up -1 1 8\n"
    )
    c = node.check("lustre network", models=[model])
    assert c.status == WARN and "over tcp only" in c.detail and "efa_0" in c.detail
    assert "lnetctl net add --net efa0" in c.fix


def test_lnet_over_o2ib_is_ok(node):
    model = lustre_node(node)
    node.write("/sys/class/infiniband/mlx5_0/node_type", "1\n")
    node.commands[("lnetctl", "net", "show")] = "net:\n    - net type: o2ib1\n        - nid: 10.0.0.5@o2ib1\n"
    assert node.check("lustre network", models=[model]).status == OK


def test_model_storage_that_gds_cannot_read_warns(node):
    with_nvidia_fs(node)
    node.write(
        "/proc/self/mountinfo",
        "22 1 259:2 / / rw - ext4 /dev/nvme0n1p2 rw\n"
        "60 22 0:50 / /models rw - nfs4 filer:/models rw,vers=4.2,proto=tcp\n"
        "61 22 0:51 / /fast rw - nfs4 filer:/fast rw,vers=4.2,proto=rdma\n",
    )
    node.write("/models/a/config.json", "{}")
    node.write("/fast/b/config.json", "{}")
    slow = node.check("storage /models/a", models=["/models/a", "/fast/b"])
    assert slow.status == WARN and "without proto=rdma" in slow.detail and "bounce" in slow.detail
    fast = node.check("storage /fast/b", models=["/models/a", "/fast/b"])
    assert fast.status == OK and "GDS capable" in fast.detail


def nfs_node(node: Node, options: str) -> str:
    node.write(
        "/proc/self/mountinfo",
        "22 1 259:2 / / rw - ext4 /dev/nvme0n1p2 rw\n"
        f"60 22 0:50 / /models rw,relatime - nfs4 filer:/models {options}\n",
    )
    node.write("/models/llama/config.json", "{}")
    return "/models/llama"


def test_nfs_with_one_connection_and_small_reads_warns_naming_both_fixes(node):
    model = nfs_node(node, "rw,vers=4.2,rsize=262144,wsize=262144,hard,proto=tcp,timeo=600,addr=10.0.0.9")
    c = node.check(f"nfs reads {model}", models=[model])
    assert c.status == WARN, c
    assert "nfs4 4.2 from filer:/models, rsize 256 KiB, 1 TCP connection(s)" in c.detail
    assert "one TCP connection" in c.detail and "pieces of 256 KiB" in c.detail
    assert c.fix == (
        "mount /models with nconnect=16,rsize=1048576 (in /etc/fstab or the automounter's map; "
        "nconnect needs Linux 5.3 or later)"
    )


def test_nfs_with_nconnect_and_1m_reads_is_ok(node):
    model = nfs_node(node, "rw,vers=4.2,rsize=1048576,wsize=1048576,hard,proto=tcp,nconnect=16,addr=10.0.0.9")
    c = node.check(f"nfs reads {model}", models=[model])
    assert c.status == OK and "rsize 1024 KiB, 16 TCP connection(s)" in c.detail, c


def test_nfs_over_rdma_needs_no_more_connections(node):
    model = nfs_node(node, "rw,vers=4.2,rsize=1048576,proto=rdma,port=20049")
    c = node.check(f"nfs reads {model}", models=[model])
    assert c.status == OK and "over RDMA" in c.detail, c
    assert not any(x.name.startswith("nfs reads") for x in checks(system=node.system(), models=["/"]))
    model = nfs_node(node, "rw,vers=4.2,rsize=1048576,proto=rdma6,port=20049")  # RDMA over IPv6
    c = node.check(f"nfs reads {model}", models=[model])
    assert c.status == OK and "over RDMA" in c.detail, c


def test_preload_paths_of_the_config_are_checked(node):
    node.write("/etc/hotweights/config.toml", 'backend = "cuda"\n[[preload]]\nname = "m"\npath = "/nowhere/m"\n')
    results = checks(system=node.system())
    assert next(c for c in results if c.name == "config").status == OK
    missing = next(c for c in results if c.name == "storage /nowhere/m")
    assert missing.status == FAIL and "[[preload]]" in missing.detail, missing
    # a path given with --models is only looked at: nothing loads it at start
    assert node.check("storage /nowhere/x", models=["/nowhere/x"]).status == WARN


def test_a_preload_path_this_user_may_not_search_warns_rather_than_fails(node):
    # The models are often open to the daemon's user alone (setfacl -m u:hotweights:rX): doctor, run as
    # an operator, gets EACCES from stat, which is no sign that the path is missing.
    node.write("/etc/hotweights/config.toml", 'backend = "cuda"\n[[preload]]\nname = "m"\npath = "/priv/m"\n')
    node.write("/priv/m", "")
    sy = node.system()
    sy.user = lambda: "alice"

    def stat(path):
        if path.endswith("/priv/m"):
            raise PermissionError(13, "Permission denied", path)
        return Path(path).stat()

    sy.stat = stat
    (c,) = [c for c in checks(system=sy) if c.name == "storage /priv/m"]
    assert c.status == WARN and "cannot be checked as user alice" in c.detail, c
    assert "does not exist" not in c.detail and "sudo -u hotweights" in c.fix, c


def test_loads_that_failed_at_the_daemons_start_fail(node):
    node.status.start_failures = ["preload m from /nowhere/m: /nowhere/m: no such file or directory"]
    c = node.check("daemon")
    assert c.status == FAIL and "1 load(s) at its start failed: preload m from /nowhere/m" in c.detail, c


def test_a_broken_config_fails(node):
    node.write("/etc/hotweights/config.toml", "backend = \n")
    assert node.check("config").status == FAIL


def test_a_config_the_daemon_refuses_fails_with_its_message(node):
    node.write("/etc/hotweights/config.toml", 'resrve = "4GiB"\n')
    node.refusal = "config file /etc/hotweights/config.toml: unknown key(s) ['resrve']"
    c = node.check("config")
    assert c.status == FAIL and "unknown key(s) ['resrve']" in c.detail


def test_the_configs_socket_is_the_daemons_unless_one_is_named(node):
    node.write("/etc/hotweights/config.toml", 'socket = "/srv/hw.sock"\n')
    checks(system=node.system())
    checks("/flag.sock", system=node.system())
    sy = node.system()
    sy.env = {"HOTWEIGHTS_SOCKET": "/env.sock"}
    checks(system=sy)
    assert node.asked == ["/srv/hw.sock", "/flag.sock", None]


def test_memlock_64_kib_in_the_daemon_fails(node):
    node.write("/proc/4242/limits", "Max locked memory         65536                65536                bytes\n")
    c = node.check("memlock")
    assert c.status == FAIL and "the daemon's (pid 4242) limit is 64 KiB" in c.detail
    assert "LimitMEMLOCK=infinity" in c.fix


def test_memlock_64_kib_in_this_shell_warns_without_a_daemon(node):
    node.status = errors.Unavailable("no daemon", fix="start it")
    node.memlock = (65536, 65536)
    c = node.check("memlock")
    assert c.status == WARN and "this shell's limit is 64 KiB" in c.detail and "LimitMEMLOCK=infinity" in c.fix


def test_memlock_unlimited_is_ok(node):
    node.status = errors.Unavailable("no daemon")
    node.memlock = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
    assert node.check("memlock").status == OK


def test_gpus_without_a_numa_node_warn(node):
    node.write("/sys/devices/system/node/node1/cpulist", "32-63\n")
    node.gpu("0000:9a:00.0", -1)
    c = node.check("numa")
    assert c.status == WARN and "0000:9a:00.0" in c.detail and "SRAT" in c.fix
    node.gpu("0000:9a:00.0", 1)
    c = node.check("numa")
    assert c.status == OK and f"{GPU} node 0" in c.detail and "0000:9a:00.0 node 1" in c.detail


def test_an_unreachable_daemon_fails_with_its_fix(node):
    node.status = errors.Unavailable(
        "nothing listens on /run/hotweights/hotweights.sock. Fix: start it", reason="refused", fix="start it"
    )
    c = node.check("daemon")
    assert c.status == FAIL and c.detail == "nothing listens on /run/hotweights/hotweights.sock" and c.fix == "start it"


def test_the_cpu_backend_on_a_gpu_node_warns(node):
    node.status.backend = "cpu"  # type: ignore[attr-defined]
    c = node.check("daemon")
    assert c.status == WARN and "host memory" in c.detail


def test_cuda_bindings_missing_on_a_gpu_node_fails(node):
    sy = node.system()
    sy.version = lambda pkg: None if pkg == "cuda-bindings" else "1.0"
    c = next(c for c in checks(system=sy) if c.name == "package cuda-bindings")
    assert c.status == FAIL and "cuda-bindings" in c.fix and "[cuda] extra" in c.fix


def test_a_cpu_node_needs_no_gpu_setup(tmp_path):
    node = Node(tmp_path)
    (tmp_path / "proc/driver/nvidia/version").unlink()
    sy = node.system()
    sy.cuda = lambda: (0, "no CUDA device visible")
    sy.getrlimit = lambda _r: (65536, 65536)
    sy.version = lambda pkg: None if pkg == "cuda-bindings" else "1.0"
    node.status.backend = "cpu"  # type: ignore[attr-defined]
    results = checks(system=sy)
    assert [c for c in results if c.status != OK] == []


def test_stripe_layouts_lfs_prints():
    assert parse_stripe(DEFAULT_STRIPES) == (1, 1048576)
    assert parse_stripe(WIDE_FILE) == (-1, 16777216)
    # a composite (PFL) layout: the last component covers the bulk of a large file
    pfl = (
        "lcm_entry_count: 2\n lmm_stripe_count: 1\n lmm_stripe_size: 1048576\n"
        " lmm_stripe_count: 8\n lmm_stripe_size: 16777216\n"
    )
    assert parse_stripe(pfl) == (8, 16777216)
    assert parse_stripe("no layout") is None


@pytest.mark.parametrize(("version", "status"), [("252", WARN), ("254", OK)])
def test_a_systemd_without_fd_store_warns_that_a_restart_reloads(node, version, status):
    (node.root / "run/systemd/system").mkdir(parents=True)
    node.commands[("systemctl", "--version")] = f"systemd {version} ({version}.1-1)\n+PAM +AUDIT\n"
    c = node.check("fd store")
    assert c.status == status, c
    if status == WARN:
        assert "reloads every version from storage" in c.detail and "254" in c.fix


def test_no_systemd_no_fd_store_check(node):
    assert "fd store" not in {c.name for c in checks(system=node.system())}


def test_systemd_installed_but_not_running_no_fd_store_check(node):
    # a container, or a host whose PID 1 is something else: systemctl answers, yet no unit runs the daemon
    node.commands[("systemctl", "--version")] = "systemd 252 (252.1-1)\n+PAM +AUDIT\n"
    assert "fd store" not in {c.name for c in checks(system=node.system())}
