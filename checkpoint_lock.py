"""One training process per checkpoint: a lock file beside it, ``PATH.lock``.

The file is created atomically with its content already in it (written to a unique
temporary file, then ``os.link``ed to ``PATH.lock``, which fails if the name exists;
where hard links are not supported, ``O_CREAT | O_EXCL``). Both are atomic on local file
systems, NFS (v3 and later) and Lustre, where ``flock`` may be local to one node. The
content is one JSON object: ``host``, ``pid``, ``start`` (the process's start time in
clock ticks since boot, /proc/PID/stat), ``boot_id``, ``pid_ns`` (pid namespace), ``since``
(UTC) and ``token`` (random, names this holding).

A lock blocks while its holder lives:
- same host, same boot and pid namespace: the holder lives while a process with its pid
  and its start time exists (a reused pid has another start time). A SIGKILLed holder's
  lock is free at once.
- otherwise (another node of a cluster sharing the file system): the holder touches the
  file every HEARTBEAT_S seconds; the lock is stale when its modification time is more
  than STALE_S seconds behind the file system's clock (read from a file this process has
  just written there, so the nodes' clocks need not agree).
A stale lock is removed under a short-lived guard (``PATH.lock.break``, taken the same
way), so that two processes cannot both replace it. The holder removes its lock on every
exit through Python (normal end, ``error:``, SIGTERM / Ctrl-C handled by main.py, an
exception); SIGKILL and a node crash leave it, and the rules above free it.

Ranks of one job share the lock: rank 0 takes it, the other ranks receive rank 0's
outcome and stop with the same ``error:`` line when it was refused. Evaluation and
generation read checkpoints without it.
"""
import atexit
import errno
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import List, Optional, Tuple

from utils import ConfigError, all_gather_objects, unwritable_reason

HEARTBEAT_S = 30.0  # the holder refreshes the lock file's modification time this often
STALE_S = 180.0  # a lock of another host whose file is older than this is stale (6 missed beats)
GUARD_STALE_S = 30.0  # a break guard left this long by a dead process is removed
_held: List["CheckpointLock"] = []  # the locks this process holds


def lock_path(checkpoint) -> Path:
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + ".lock")


# ---- who is this process ---------------------------------------------------------
def _read_text(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def start_ticks(pid: int) -> Optional[int]:
    """The process's start time (clock ticks after boot), or None where /proc has no such pid."""
    stat = _read_text(f"/proc/{pid}/stat")
    if stat is None:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the name (field 2) may hold spaces


def _pid_namespace() -> Optional[str]:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def owner_info() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": start_ticks(os.getpid()),
            "boot_id": _read_text("/proc/sys/kernel/random/boot_id"), "pid_ns": _pid_namespace(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "token": uuid.uuid4().hex}


def _pid_alive(pid: int, start) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    now = start_ticks(pid)
    return start is None or now is None or now == start


# ---- the file ---------------------------------------------------------------------
def _create(path: Path, content: str) -> Tuple[bool, float]:
    """Create ``path`` holding ``content`` atomically: whether it was created (False when
    ``path`` exists), and the file system's clock at the time (a file just written there)."""
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    with open(tmp, "w") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
    fs_now = tmp.stat().st_mtime
    try:
        try:
            os.link(tmp, path)
        except OSError as err:
            if err.errno == errno.EEXIST:
                return False, fs_now
            if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            return _create_exclusive(path, content, fs_now)  # no hard links here
        return True, fs_now
    finally:
        tmp.unlink()


def _create_exclusive(path: Path, content: str, fs_now: float) -> Tuple[bool, float]:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False, fs_now
    with os.fdopen(fd, "w") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
    return True, fs_now


def _read(path: Path) -> Optional[dict]:
    """The lock's owner and the file's mtime (``mtime``), or None when there is no file.
    A file still being written (the O_EXCL fallback) reads as an owner without a pid."""
    try:
        mtime = path.stat().st_mtime
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        info = json.loads(text)
    except ValueError:
        info = {}
    return {**(info if isinstance(info, dict) else {}), "mtime": mtime}


def is_stale(info: dict, fs_now: float) -> bool:
    """Whether the holder described by ``info`` is gone (rules in the module docstring)."""
    me = owner_info()
    same_machine = (info.get("host") == me["host"] and info.get("boot_id") == me["boot_id"]
                    and info.get("pid_ns") == me["pid_ns"] and isinstance(info.get("pid"), int))
    if same_machine:
        return not _pid_alive(info["pid"], info.get("start"))
    if info.get("host") == me["host"] and info.get("boot_id") != me["boot_id"] and me["boot_id"]:
        return True  # this machine rebooted since
    return fs_now - info["mtime"] > STALE_S


def describe(info: dict, path: Path) -> str:
    if "pid" not in info:
        return f"another process (the lock file {path} is being written)"
    return f"process {info['pid']} on host {info.get('host', '?')} since {info.get('since', '?')}"


def _break_stale(path: Path, info: dict) -> None:
    """Remove the stale lock ``info`` (unless it changed meanwhile), under a guard."""
    guard = path.with_name(path.name + ".break")
    created, _ = _create(guard, json.dumps(owner_info()))
    if not created:
        held = _read(guard)
        if held is not None and time.time() - held["mtime"] > GUARD_STALE_S:
            guard.unlink(missing_ok=True)  # left by a process that died while breaking
        return
    try:
        current = _read(path)
        if current is not None and current.get("token") == info.get("token"):
            path.unlink(missing_ok=True)
    finally:
        guard.unlink(missing_ok=True)


def _missing_folders(folder: Path) -> List[Path]:
    """The folders that do not exist yet, deepest first."""
    missing = []
    folder = folder.absolute()
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


# ---- the lock -----------------------------------------------------------------------
class CheckpointLock:
    """The lock of one checkpoint path, held by this process from ``acquire`` to ``release``."""

    def __init__(self, checkpoint):
        self.checkpoint = str(checkpoint)
        self.path = lock_path(checkpoint)
        self.info: Optional[dict] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._made: List[Path] = []  # folders made for the lock, removed again if left empty

    def acquire(self, wait_s: float = 1.0) -> Optional[dict]:
        """Take the lock: None when taken, else the live holder's information."""
        self._made = _missing_folders(self.path.parent)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + wait_s
        while True:
            info = owner_info()
            created, fs_now = _create(self.path, json.dumps(info))
            if created:
                self._hold(info)
                return None
            held = _read(self.path)
            if held is None:
                continue  # released in between: try again
            if is_stale(held, fs_now):
                _break_stale(self.path, held)
            elif "pid" in held or time.monotonic() > deadline:
                return held
            if time.monotonic() > deadline:
                return held
            time.sleep(0.02)

    def _hold(self, info: dict) -> None:
        self.info = info
        _held.append(self)
        if len(_held) == 1:
            atexit.register(release_all)
        self._thread = threading.Thread(target=self._beat, name="checkpoint-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        """Touch the file every HEARTBEAT_S seconds; warn once if it is no longer ours."""
        warned = False
        while not self._stop.wait(HEARTBEAT_S):
            held = _read(self.path)
            if held is not None and held.get("token") == self.info["token"]:
                os.utime(self.path)
            elif not warned:
                warned = True
                print(f"warning: the lock {self.path} of this training was removed or taken by "
                      f"{describe(held, self.path) if held else 'no one'}; two runs may now write "
                      f"{self.checkpoint}", flush=True)

    def release(self) -> None:
        if self.info is None:
            return
        self._stop.set()
        held = _read(self.path)
        if held is not None and held.get("token") == self.info["token"]:
            self.path.unlink(missing_ok=True)
        self.info = None
        for folder in self._made:  # a run that stopped before writing leaves no new folder
            try:
                folder.rmdir()
            except OSError:
                break
        if self in _held:
            _held.remove(self)


def release_all() -> None:
    """Release every lock this process holds (main.py's exit path; also run at exit)."""
    for lock in list(_held):
        lock.release()


def refusal_line(checkpoint: str, holder: dict, path: Path) -> str:
    return (f"--checkpoint {checkpoint} is being trained by {describe(holder, path)} (lock file {path}); "
            "wait for that run to end or stop it, or train into another --checkpoint. The lock of a "
            f"process that is gone does not count: on the same host at once, from another host after "
            f"{STALE_S:.0f} s without its heartbeat")


def hold_for_training(checkpoint: Optional[str], dist, training: bool = True) -> Optional[CheckpointLock]:
    """Rank 0 takes the lock of ``checkpoint`` for a training run; every rank raises the same
    ConfigError when another live process holds it. Nothing is taken when not ``training``
    (evaluation, dry runs) or without a checkpoint. A folder where no lock can be created is
    left to the writability check that follows (no lock, no error here)."""
    if not checkpoint or not training:
        return None
    lock, refusal = None, None
    if dist.is_main and not Path(checkpoint).is_dir() and not unwritable_reason(Path(checkpoint).parent):
        lock = CheckpointLock(checkpoint)
        try:
            holder = lock.acquire()
        except OSError:
            holder, lock = None, None
        if holder is not None:
            refusal, lock = refusal_line(checkpoint, holder, lock.path), None
    refusal = all_gather_objects(refusal, dist)[0]  # rank 0's outcome, on every rank
    if refusal:
        raise ConfigError(refusal)
    return lock
