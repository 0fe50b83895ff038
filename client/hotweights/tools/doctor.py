"""``hotweights doctor``: an operator's checklist for a node, each line OK, WARN or FAIL with its fix.

FAIL: hotweights will not work as configured (no daemon, CUDA unusable on a GPU node, cuFile set
to refuse every file). WARN: it works, slower than it could or than the operator likely thinks
(GPUDirect Storage off, a silent fallback to cuFile's bounce path, default Lustre striping, Lustre
over TCP, GPUs without a NUMA node). ``docs/operations.md`` explains each fix.

Every probe of the node goes through :class:`System`: files are read under a root prefix and
commands, limits, package versions, CUDA and the daemon are functions, so tests fake a node.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

OK, WARN, FAIL = "ok", "warn", "fail"
MiB, GiB = 2**20, 2**30
# Filesystems cuFile reads with GPUDirect Storage (NVIDIA's GDS documentation); NFS only over RDMA.
GDS_FILESYSTEMS = {"ext4", "xfs", "lustre", "wekafs", "gpfs", "beegfs"}
# Below this a bounce-path load of a few GPUs cannot pin its staging ring (16 readers x 2 x 4 MiB per GPU).
MEMLOCK_NEEDED = 1 * GiB
LUSTRE_STRIPE_SIZE = 16 * MiB
DEFAULT_CONFIG = "/etc/hotweights/config.toml"


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str
    fix: str = ""

    @property
    def ok(self) -> bool:
        return self.status != FAIL

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "ok": self.ok, "detail": self.detail, "fix": self.fix}


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(cmd: list[str]) -> str | None:
    """A command's stdout, or None when it is not installed or fails."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout if r.returncode == 0 else None


def _cuda() -> tuple[int, str | None]:
    """(visible CUDA devices, why none) through the driver API."""
    try:
        from hotweights.cuda import devices

        reason = devices.unavailable_reason()
        return (0, reason) if reason else (devices.device_count(), None)
    except Exception as exc:  # the check reports, it must not fail
        return 0, f"{type(exc).__name__}: {exc}"


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _serve_check(path: str, env: dict[str, str]) -> str | None:
    """The daemon's own verdict on the config file at ``path``: None when it would start with it, else
    its message. The daemon's rules are the daemon's code, which this package does not import: its
    ``--print-config`` answers in a child process. The shell's HOTWEIGHTS_* variables stay out of it:
    the unit's environment, not the operator's shell, is what the daemon reads."""
    clean = {k: v for k, v in env.items() if not k.startswith("HOTWEIGHTS_")}
    cmd = [sys.executable, "-m", "hotweights", "serve", "--config", path, "--print-config"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=clean)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`hotweights serve --print-config` could not run: {exc}"
    if r.returncode == 0:
        return None
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    message = lines[-1] if lines else f"exited with {r.returncode}"
    return message.removeprefix("hotweights serve: ")


def _user() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


def _daemon_status(socket: str | None, origin: str | None) -> Any:
    from hotweights.client import connect

    with connect(socket, timeout=3, origin=origin) as c:
        return c.status()


@dataclass
class System:
    """What doctor knows of the node. Paths are absolute as on the node; ``root`` prefixes them."""

    root: str = "/"
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    run: Callable[[list[str]], str | None] = _run
    getrlimit: Callable[[int], tuple[int, int]] = resource.getrlimit
    version: Callable[[str], str | None] = _version
    has_module: Callable[[str], bool] = _has_module
    cuda: Callable[[], tuple[int, str | None]] = _cuda
    daemon: Callable[[str | None, str | None], Any] = _daemon_status
    serve_check: Callable[[str, dict[str, str]], str | None] = _serve_check
    stat: Callable[[str], Any] = os.stat
    user: Callable[[], str] = _user

    def path(self, p: str) -> str:
        return os.path.join(self.root, p.lstrip("/"))

    def read(self, p: str) -> str | None:
        try:
            with open(self.path(p), encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return None

    def listdir(self, p: str) -> list[str]:
        try:
            return sorted(os.listdir(self.path(p)))
        except OSError:
            return []

    def stat_error(self, p: str) -> OSError | None:
        """Why ``p`` cannot be looked at (None: it can). Not os.path.exists, which says False for a path
        this user may not search as for one that is not there: the daemon's user may well read it."""
        try:
            self.stat(self.path(p))
        except OSError as exc:
            return exc
        return None

    def isdir(self, p: str) -> bool:
        return os.path.isdir(self.path(p))


def checks(
    socket: str | None = None,
    *,
    origin: str | None = None,
    models: Iterable[str] = (),
    config: str | None = None,
    system: System | None = None,
) -> list[Check]:
    """Every check, in the order an operator fixes things: software, GPUs, storage, limits, daemon."""
    sy = system or System()
    out: list[Check] = []
    cfg_path = config or DEFAULT_CONFIG
    cfg, cfg_check = read_config(sy, cfg_path, explicit=config is not None)
    if cfg_check is not None:
        out.append(cfg_check)
    gpu_node, gpu_checks = check_gpus(sy)
    out += check_packages(sy, gpu_node)
    out += gpu_checks
    nvfs = nvidia_fs_loaded(sy)
    gds_setting = str(cfg.get("gds", "auto"))
    out += check_gds(sy, gpu_node, nvfs, gds_setting)
    preload = not models
    paths = list(models) or [str(p["path"]) for p in cfg.get("preload", []) if isinstance(p, dict) and "path" in p]
    out += check_storage(sy, paths, gpu_node and nvfs and gds_setting != "off", preload=preload)
    out.append(check_numa(sy))
    fdstore = check_fdstore(sy)
    if fdstore is not None:
        out.append(fdstore)
    if socket is None and not sy.env.get("HOTWEIGHTS_SOCKET") and isinstance(cfg.get("socket"), str) and cfg["socket"]:
        socket, origin = cfg["socket"], f"socket in {cfg_path}"
    status, daemon_check = check_daemon(sy, socket, origin, gpu_node)
    out.append(check_memlock(sy, gpu_node, getattr(status, "pid", None)))
    out.append(daemon_check)
    return out


def as_dicts(items: list[Check]) -> list[dict[str, Any]]:
    return [c.to_json() for c in items]


# ---- config --------------------------------------------------------------------------------------


def read_config(sy: System, path: str, explicit: bool) -> tuple[dict[str, Any], Check | None]:
    text = sy.read(path)
    if text is None:
        if explicit:
            return {}, Check("config", FAIL, f"{path}: cannot be read", "give the path of the daemon's config.toml")
        return {}, None
    try:
        cfg = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return {}, Check("config", FAIL, f"{path}: not valid TOML: {exc}", f"fix {path}: the daemon refuses to start")
    refused = sy.serve_check(sy.path(path), sy.env)
    if refused is not None:
        return cfg, Check("config", FAIL, f"{path}: {refused}", f"fix {path}: the daemon refuses to start with it")
    n = len(cfg.get("preload", []) or [])
    return cfg, Check(
        "config", OK, f"{path}: backend {cfg.get('backend', 'auto')}, {n} preload entr{'y' if n == 1 else 'ies'}"
    )


# ---- software and GPUs ---------------------------------------------------------------------------


def check_gpus(sy: System) -> tuple[bool, list[Check]]:
    """(whether this is a GPU node, the checks): a node with the NVIDIA driver loaded is one."""
    driver = sy.read("/proc/driver/nvidia/version")
    count, why = sy.cuda()
    if driver is None and count == 0:
        return False, [Check("nvidia driver", OK, "no NVIDIA driver: a CPU node, the cpu backend serves host memory")]
    first = (driver or "").strip().splitlines()[0] if driver else "loaded"
    out = [Check("nvidia driver", OK, re.sub(r"\s+", " ", first)[:120])]
    if count:
        out.append(Check("cuda devices", OK, f"{count} CUDA device(s) visible"))
    else:
        out.append(
            Check(
                "cuda devices",
                FAIL,
                f"the NVIDIA driver is loaded but CUDA sees no device: {why}",
                "pip install 'cuda-bindings>=12.6' (the [cuda] extra); check `nvidia-smi` and CUDA_VISIBLE_DEVICES",
            )
        )
    return True, out


def check_packages(sy: System, gpu_node: bool) -> list[Check]:
    out = []
    for pkg in ("grpcio", "protobuf"):
        v = sy.version(pkg)
        out.append(
            Check(f"package {pkg}", OK, v)
            if v
            else Check(
                f"package {pkg}",
                FAIL,
                "not installed",
                "reinstall hotweights from its checkout or wheel: pip install --force-reinstall PATH",
            )
        )
    v = sy.version("torch")
    out.append(
        Check("package torch", OK, v)
        if v
        else Check(
            "package torch",
            WARN,
            "not installed: serving processes that attach need it (the daemon does not)",
            "pip install torch safetensors (the [torch] extra) in the serving environment",
        )
    )
    v = sy.version("cuda-bindings")
    if v:
        out.append(Check("package cuda-bindings", OK, v))
    elif gpu_node:
        out.append(
            Check(
                "package cuda-bindings",
                FAIL,
                "not installed on a GPU node: the daemon falls back to the cpu backend",
                "pip install 'cuda-bindings>=12.6' (the [cuda] extra)",
            )
        )
    else:
        out.append(Check("package cuda-bindings", OK, "not installed (not needed without a GPU)"))
    return out


# ---- GPUDirect Storage ---------------------------------------------------------------------------


def nvidia_fs_loaded(sy: System) -> bool:
    modules = sy.read("/proc/modules") or ""
    return any(line.split(" ", 1)[0] == "nvidia_fs" for line in modules.splitlines())


def _json_with_comments(text: str) -> Any:
    """cufile.json as NVIDIA ships it: JSON with // comments."""
    lines = []
    for line in text.splitlines():
        out, in_str, i = [], False, 0
        while i < len(line):
            ch = line[i]
            if ch == '"' and (i == 0 or line[i - 1] != "\\"):
                in_str = not in_str
            if not in_str and line.startswith("//", i):
                break
            out.append(ch)
            i += 1
        lines.append("".join(out))
    return json.loads(re.sub(r",(\s*[}\]])", r"\1", "\n".join(lines)))


def check_gds(sy: System, gpu_node: bool, nvfs: bool, setting: str) -> list[Check]:
    if not gpu_node:
        return [Check("GPUDirect Storage", OK, "not needed without a GPU")]
    if setting == "off":
        return [Check("GPUDirect Storage", OK, 'off in the config (gds = "off")')]
    devs = [d for d in sy.listdir("/dev") if d.startswith("nvidia-fs")]
    out = []
    if not nvfs:
        out.append(
            Check(
                "GPUDirect Storage",
                WARN,
                "nvidia_fs module not loaded: GPUDirect Storage is off, loads take the pinned bounce path "
                "(one more copy, through host memory)",
                "install the GDS driver (the nvidia-gds package of the CUDA repository), then "
                "`sudo modprobe nvidia_fs` and add it to /etc/modules-load.d/",
            )
        )
    elif not devs:
        out.append(
            Check(
                "GPUDirect Storage",
                WARN,
                "nvidia_fs loaded, but no /dev/nvidia-fs* device nodes: the daemon uses GDS only where they exist",
                "reload the module so udev makes them (`sudo modprobe -r nvidia_fs && sudo modprobe nvidia_fs`); in a "
                "container, pass /dev/nvidia-fs* in; `gdscheck -p` (GDS tools) reports the platform",
            )
        )
    else:
        out.append(Check("GPUDirect Storage", OK, f"nvidia_fs loaded, {len(devs)} /dev/nvidia-fs* device(s)"))
    out.append(check_cufile(sy, nvfs))
    return out


def check_cufile(sy: System, nvfs: bool) -> Check:
    path = sy.env.get("CUFILE_ENV_PATH_JSON") or "/etc/cufile.json"
    text = sy.read(path)
    if text is None:
        return Check(
            "cufile.json",
            WARN if nvfs else OK,
            f"no {path}: cuFile's defaults apply (allow_compat_mode true: where GDS cannot work it falls "
            f"back to its bounce path without an error)",
            "install the GDS package's /etc/cufile.json and review allow_compat_mode" if nvfs else "",
        )
    try:
        doc = _json_with_comments(text)
        compat = (doc.get("properties") or {}).get("allow_compat_mode", True)
    except (ValueError, AttributeError) as exc:
        return Check("cufile.json", FAIL, f"{path}: cuFile cannot parse it: {exc}", f"fix the JSON in {path}")
    if compat is False and not nvfs:
        return Check(
            "cufile.json",
            FAIL,
            f"{path}: allow_compat_mode is false and nvidia_fs is not loaded: cuFile refuses every file, "
            f"GDS loads fail",
            'load nvidia_fs (`sudo modprobe nvidia_fs`), or set "allow_compat_mode": true, or gds = "off" in '
            "/etc/hotweights/config.toml",
        )
    if compat is not False and nvfs:
        return Check(
            "cufile.json",
            WARN,
            f"{path}: allow_compat_mode is true: where GDS cannot work (an unsupported filesystem, a missing "
            f"mount option) cuFile silently falls back to its bounce path",
            "confirm `hotweights status` reports the gds path after a load; while validating a node set "
            '"allow_compat_mode": false so a fallback becomes an error',
        )
    return Check("cufile.json", OK, f"{path}: allow_compat_mode {str(compat).lower()}")


# ---- model storage -------------------------------------------------------------------------------


@dataclass
class Mount:
    point: str
    fstype: str
    source: str
    options: str


def _unescape(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def mounts(sy: System) -> list[Mount]:
    out = []
    for line in (sy.read("/proc/self/mountinfo") or "").splitlines():
        left, sep, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if not sep or len(fields) < 5 or len(rest) < 2:
            continue
        out.append(Mount(_unescape(fields[4]), rest[0], rest[1], rest[2] if len(rest) > 2 else ""))
    return out


def mount_of(sy: System, path: str) -> Mount | None:
    path = os.path.normpath(path)
    best = None
    for m in mounts(sy):
        if (path == m.point or path.startswith(m.point.rstrip("/") + "/")) and (
            best is None or len(m.point) >= len(best.point)
        ):
            best = m
    return best


def gds_capable(m: Mount) -> bool:
    if m.fstype in GDS_FILESYSTEMS:
        return True
    return m.fstype in ("nfs", "nfs4") and _over_rdma(m)


def check_storage(sy: System, paths: list[str], gds_wanted: bool, preload: bool = False) -> list[Check]:
    """``preload``: the paths are the config's [[preload]] entries, which the daemon loads at every start."""
    out: list[Check] = []
    lustre: list[str] = []
    for p in paths:
        name = f"storage {p}"
        error = sy.stat_error(p)
        if isinstance(error, PermissionError):
            out.append(
                Check(
                    name,
                    WARN,
                    f"cannot be checked as user {sy.user()} (permission denied on the way to it); the daemon "
                    f"reads it as its own user",
                    # the packaged unit's User=; another install knows its own
                    "run doctor as the daemon's user (`sudo -u hotweights hotweights doctor`) or as root to check it",
                )
            )
            continue
        if error is not None:
            what = "does not exist" if isinstance(error, FileNotFoundError | NotADirectoryError) else error.strerror
            if preload:  # the daemon still reports READY, so nothing else would show that its preload failed
                out.append(
                    Check(
                        name,
                        FAIL,
                        f"{what}: the daemon's [[preload]] of it fails at every start",
                        "mount the model filesystem, or fix the [[preload]] path",
                    )
                )
            else:
                out.append(Check(name, WARN, str(what), "mount the model filesystem, or fix the path"))
            continue
        m = mount_of(sy, p)
        if m is None:
            out.append(Check(name, WARN, "no mount found for it in /proc/self/mountinfo"))
            continue
        where = f"{m.fstype} on {m.point} ({m.source})"
        if gds_wanted and not gds_capable(m):
            out.append(
                Check(
                    name,
                    WARN,
                    f"{where}: GPUDirect Storage does not read from {m.fstype}"
                    f"{' without proto=rdma' if m.fstype.startswith('nfs') else ''}: cuFile takes its bounce "
                    f"path (or fails where allow_compat_mode is false)",
                    "keep models on a GDS filesystem (local NVMe with ext4/xfs, Lustre, WekaFS, GPFS, BeeGFS, "
                    "NFS over RDMA)",
                )
            )
        else:
            gds = (" (GDS capable)" if gds_capable(m) else "") if gds_wanted else ""
            out.append(Check(name, OK, where + gds))
        if m.fstype == "lustre":
            lustre.append(p)
            out.append(check_striping(sy, p))
        elif m.fstype in ("nfs", "nfs4"):
            out.append(check_nfs(m, p))
    if lustre:
        out.append(check_lnet(sy))
    return out


_COUNT = re.compile(r"(?:lmm_)?stripe_count:\s+(-?\d+)")
_SIZE = re.compile(r"(?:lmm_)?stripe_size:\s+(\d+)")


def parse_stripe(text: str) -> tuple[int, int] | None:
    """(stripe count, stripe size) of the last layout component ``lfs getstripe`` printed."""
    counts, sizes = _COUNT.findall(text), _SIZE.findall(text)
    if not counts or not sizes:
        return None
    return int(counts[-1]), int(sizes[-1])


def check_striping(sy: System, path: str) -> Check:
    name = f"lustre striping {path}"
    fix = f"`lfs setstripe -c -1 -S 16M {path}` (new files); rewrite existing ones with `lfs migrate -c -1 -S 16M FILE`"
    targets = [path]
    if sy.isdir(path):
        files = [f for f in sy.listdir(path) if f.endswith(".safetensors")]
        if files:
            targets.append(os.path.join(path, files[0]))
    seen = []
    poor = []
    for t in targets:
        args = ["lfs", "getstripe", "-d", t] if t == path and sy.isdir(path) else ["lfs", "getstripe", t]
        text = sy.run(args)
        if text is None:
            return Check(
                name,
                WARN,
                "`lfs getstripe` is not available or failed: striping unknown",
                "install lustre-client utilities",
            )
        layout = parse_stripe(text)
        if layout is None:
            return Check(name, WARN, f"cannot read the layout `lfs getstripe` printed for {t}")
        count, size = layout
        label = "directory default" if t == path else os.path.basename(t)
        seen.append(f"{label}: {'all OSTs' if count == -1 else f'{count} OST(s)'}, {size // 1024} KiB stripes")
        if count == 1 or size < LUSTRE_STRIPE_SIZE:
            poor.append(label)
    detail = "; ".join(seen)
    if poor:
        return Check(
            name,
            WARN,
            f"{detail}: {', '.join(poor)} not striped wide (one OST caps a file's read bandwidth; "
            f"the recommended layout is every OST, 16 MiB stripes)",
            fix,
        )
    return Check(name, OK, detail)


# The loader's cold reads: 4 MiB each, about a dozen in flight (docs/loader.md, "NFS").
NFS_RSIZE = 1 * MiB


def _mount_options(options: str) -> dict[str, str]:
    return dict(o.partition("=")[::2] for o in options.split(",") if o)


def _over_rdma(m: Mount) -> bool:
    """An NFS mount over RDMA, IPv4 or IPv6 (GDS can read it; more TCP connections would not carry its reads)."""
    return _mount_options(m.options).get("proto") in ("rdma", "rdma6")


def check_nfs(m: Mount, path: str) -> Check:
    """NFS mount options that cap how fast a model reads: one TCP connection carries every read of a load
    (the loader keeps about a dozen in flight), and reads go to the server in pieces of ``rsize``."""
    name = f"nfs reads {path}"
    opts = _mount_options(m.options)
    rsize = int(opts["rsize"]) if opts.get("rsize", "").isdigit() else None
    conns = int(opts["nconnect"]) if opts.get("nconnect", "").isdigit() else 1
    rdma = _over_rdma(m)
    one_stream = not rdma and conns < 2
    said = [
        f"{m.fstype}{' ' + opts['vers'] if 'vers' in opts else ''} from {m.source}",
        f"rsize {rsize // 1024} KiB" if rsize else "rsize not shown",
        "over RDMA" if rdma else f"{conns} TCP connection(s)",
    ]
    problems, fixes = [], []
    if one_stream:
        problems.append("one TCP connection to the server carries every read of a load")
        fixes.append("nconnect=16")
    if rsize is not None and rsize < NFS_RSIZE:
        problems.append(f"reads reach the server in pieces of {rsize // 1024} KiB (the loader reads 4 MiB at a time)")
        fixes.append(f"rsize={NFS_RSIZE}")
    detail = ", ".join(said)
    if problems:
        return Check(
            name,
            WARN,
            f"{detail}: {'; '.join(problems)}",
            f"mount {m.point} with {','.join(fixes)} (in /etc/fstab or the automounter's map"
            + ("; nconnect needs Linux 5.3 or later)" if one_stream else ")"),
        )
    return Check(name, OK, detail)


def check_lnet(sy: System) -> Check:
    """Lustre's network: LNet over TCP leaves an InfiniBand or EFA fabric unused."""
    text = sy.run(["lnetctl", "net", "show"]) or sy.read("/proc/sys/lnet/nis")
    rdma = sy.listdir("/sys/class/infiniband")
    efa = [d for d in rdma if d.startswith("efa")]
    if text is None:
        return Check(
            "lustre network",
            WARN,
            "cannot read the LNet configuration (no lnetctl, no /proc/sys/lnet/nis)",
            "check `lnetctl net show` as root",
        )
    nets = sorted({n.rstrip("0123456789") for n in re.findall(r"@([a-z0-9]+)", text)} - {"lo"})
    if not nets:
        return Check("lustre network", WARN, "LNet shows no network interface", "`lnetctl net show` as root")
    fast = [n for n in nets if n in ("o2ib", "efa", "kfi", "gni")]
    if fast:
        return Check("lustre network", OK, f"LNet networks: {', '.join(nets)}")
    if rdma:
        want = "efa" if efa else "o2ib"
        return Check(
            "lustre network",
            WARN,
            f"LNet runs over {', '.join(nets)} only, though RDMA devices exist ({', '.join(rdma)}): Lustre "
            f"reads do not use the fabric",
            f"configure an {want} network in LNet (`lnetctl net add --net {want}0 --if IFACE`, and "
            f"`options lnet networks=...` in /etc/modprobe.d/lustre.conf)",
        )
    return Check(
        "lustre network",
        WARN,
        f"LNet runs over {', '.join(nets)} and no RDMA device is present (no EFA, no InfiniBand)",
        "on EFA instances install the EFA driver and configure LNet over efa; elsewhere o2ib over InfiniBand",
    )


# ---- limits, NUMA, the daemon --------------------------------------------------------------------


def _memlock_of(limits: str) -> int | None:
    """Soft ``Max locked memory`` from a /proc/PID/limits text; -1 for unlimited."""
    for line in limits.splitlines():
        if line.startswith("Max locked memory"):
            soft = line[len("Max locked memory") :].split()[0]
            return -1 if soft == "unlimited" else int(soft)
    return None


def _bytes(n: int) -> str:
    return f"{n // 1024} KiB" if n < MiB else f"{n / MiB:,.0f} MiB"


def check_memlock(sy: System, gpu_node: bool, daemon_pid: int | None) -> Check:
    soft: int | None = None
    whose = "this shell's"
    if daemon_pid:
        soft = _memlock_of(sy.read(f"/proc/{daemon_pid}/limits") or "")
        whose = f"the daemon's (pid {daemon_pid})"
    if soft is None:
        s, _ = sy.getrlimit(resource.RLIMIT_MEMLOCK)
        soft, whose = (-1 if s == resource.RLIM_INFINITY else s), "this shell's"
    if soft == -1 or soft >= MEMLOCK_NEEDED:
        return Check("memlock", OK, f"{whose} limit: {'unlimited' if soft == -1 else _bytes(soft)}")
    if not gpu_node:
        return Check("memlock", OK, f"{whose} limit: {_bytes(soft)} (the cpu backend pins nothing)")
    fix = "LimitMEMLOCK=infinity in the unit (hotweights.service has it); for a daemon started by hand, "
    fix += "`memlock unlimited` for its user in /etc/security/limits.d/ and a new login"
    return Check(
        "memlock",
        FAIL if daemon_pid else WARN,
        f"{whose} limit is {_bytes(soft)}: the bounce path's pinned staging buffers need about "
        f"{_bytes(MEMLOCK_NEEDED)} and will fail to allocate"
        + ("" if daemon_pid else " (a daemon under systemd takes the unit's limit, not this one)"),
        fix,
    )


def nvidia_gpus(sy: System) -> dict[str, int]:
    """PCI address -> NUMA node (-1: none reported) of every NVIDIA display or 3D controller."""
    out = {}
    for dev in sy.listdir("/sys/bus/pci/devices"):
        base = f"/sys/bus/pci/devices/{dev}"
        vendor = (sy.read(base + "/vendor") or "").strip()
        cls = (sy.read(base + "/class") or "").strip()
        if vendor != "0x10de" or not (cls.startswith("0x0300") or cls.startswith("0x0302")):
            continue
        try:
            out[dev] = int((sy.read(base + "/numa_node") or "-1").strip())
        except ValueError:
            out[dev] = -1
    return out


# The first systemd that tells a service ($FDSTORE) that it keeps stored fds, which the daemon waits for.
FDSTORE_SYSTEMD = 254


def check_fdstore(sy: System) -> Check | None:
    """Whether a restart under this host's systemd keeps resident memory; None where there is no systemd."""
    # sd_booted()'s test: a systemctl binary is also installed in containers and hosts whose PID 1 is not
    # systemd, where no unit runs the daemon and its version says nothing of a restart.
    if not sy.isdir("/run/systemd/system"):
        return None
    found = re.match(r"systemd (\d+)", sy.run(["systemctl", "--version"]) or "")
    if found is None:
        return None
    version = int(found.group(1))
    if version < FDSTORE_SYSTEMD:
        return Check(
            "fd store",
            WARN,
            f"systemd {version} sets no $FDSTORE: `systemctl restart hotweights` reloads every version from "
            f"storage instead of keeping it resident",
            f"systemd {FDSTORE_SYSTEMD} or later keeps the memory across restarts; until then, plan restarts "
            f"for when the reload's read is acceptable",
        )
    return Check("fd store", OK, f"systemd {version}: a restart keeps resident memory")


def check_numa(sy: System) -> Check:
    nodes = [n for n in sy.listdir("/sys/devices/system/node") if re.fullmatch(r"node\d+", n)]
    gpus = nvidia_gpus(sy)
    if len(nodes) < 2:
        return Check("numa", OK, f"one NUMA node{f', {len(gpus)} GPU(s)' if gpus else ''}")
    if not gpus:
        return Check("numa", OK, f"{len(nodes)} NUMA nodes, no NVIDIA GPU on the PCI bus")
    placed = ", ".join(f"{a} node {n}" for a, n in sorted(gpus.items()))
    lost = sorted(a for a, n in gpus.items() if n < 0)
    if lost:
        return Check(
            "numa",
            WARN,
            f"{len(nodes)} NUMA nodes; no node reported for GPU(s) {', '.join(lost)}: the daemon cannot keep "
            f"their staging buffers and reader threads on the GPU's socket ({placed})",
            "enable NUMA reporting in the firmware (ACPI SRAT; not 'node interleaving'); on VMs, expose the "
            "host's NUMA topology to the guest",
        )
    used = sorted({n for n in gpus.values()})
    return Check("numa", OK, f"{len(nodes)} NUMA nodes, GPUs on node(s) {', '.join(map(str, used))}: {placed}")


def check_daemon(sy: System, socket: str | None, origin: str | None, gpu_node: bool) -> tuple[Any, Check]:
    from hotweights.errors import HotweightsError

    try:
        st = sy.daemon(socket, origin)
    except HotweightsError as exc:
        fix = str(exc.details.get("fix", ""))
        detail = str(exc).split(". Fix: ")[0] if fix else str(exc)
        return None, Check("daemon", FAIL, detail, fix or "see docs/operations.md, troubleshooting")
    detail = (
        f"hotweightsd {st.daemon_version}, pid {st.pid}, backend {st.backend}, {len(st.versions)} version(s) "
        f"on {st.socket}{'; gds: ' + st.gds if st.gds else ''}"
    )
    failures = list(getattr(st, "start_failures", ()))
    if failures:
        return st, Check(
            "daemon",
            FAIL,
            f"{detail}; {len(failures)} load(s) at its start failed: {'; '.join(failures)}",
            # The daemon drops a line once what it names is loaded again: this check then passes.
            "fix what each names, then `hotweights load` it with the same name, version and alias (or restart "
            "the daemon): its line clears once that is loaded",
        )
    if gpu_node and st.backend == "cpu":
        return st, Check(
            "daemon",
            WARN,
            detail + ": the cpu backend on a GPU node keeps weights in host memory",
            'backend = "auto" or "cuda" in /etc/hotweights/config.toml, and cuda-bindings installed',
        )
    return st, Check("daemon", OK, detail)
