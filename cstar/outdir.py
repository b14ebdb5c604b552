"""One output-directory rule for every stage that writes a directory (`--out`).

Torch-free on purpose (the device side's verify writes a report directory too). The rule:

- `--out` must not hold a finished artifact of another stage, nor user data (a non-empty directory
  that is no stage's artifact), nor equal, contain or lie inside one of the stage's inputs.
- A finished artifact of the SAME stage is replaced only with `--force` (never another stage's).
- The stage writes into a temporary sibling `.<name>.tmp-<pid>-<rand>` and the sibling is renamed
  into place at the end: a crash never leaves a partial `--out`, and with `--force` the old
  directory is swapped out only once the new one is complete.
- A sibling lock file `.<name>.lock` (fcntl.flock, non-blocking) is held while writing, so a
  concurrent writer to the same `--out` fails at once with error/fix.
- Under the lock, temporaries of earlier runs (dead or killed writers) are removed.

Resumable stages (train's run directory, the pipeline's run directory) work in place: same checks and
lock, no temporary sibling (their own checkpoints make a crash safe to resume), and a finished
directory of their own stage is accepted (they decide: resume, skip or refuse). `in_place` stages
(verify's report directory, whose files are each written atomically and which may hold the attack
set it crafted) also work in place but need `force` to overwrite a finished report.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from cstar.errors import CstarError

MANIFEST_NAME = "manifest.json"
# marker file or folder -> the stage whose finished output it marks (manifest.json names its own stage)
MARKERS: dict[str, str] = {"report.json": "verify", "bench.json": "bench", "build.json": "build",
                           ".pipeline": "pipeline"}
TMP_TAG = ".tmp-"
OLD_TAG = ".old-"
LEFTOVER_PATTERNS = (".export-*", ".*.tmp")  # scratch of older cstar versions, safe to drop

PathLike = str | os.PathLike[str]


def artifact_stage(directory: PathLike) -> str | None:
    """The stage whose finished output `directory` holds ("unknown" for an unreadable manifest), else None."""
    path = Path(directory)
    manifest = path / MANIFEST_NAME
    if manifest.is_file():
        try:
            stage = json.loads(manifest.read_text(encoding="utf-8")).get("stage")
        except (OSError, ValueError, AttributeError):
            return "unknown"
        return str(stage) if isinstance(stage, str) and stage else "unknown"
    for name, stage in MARKERS.items():
        if (path / name).exists():
            return stage
    return None


def dataset_path(data: str | None) -> Path | None:
    """The filesystem path of a `--data NAME:PATH` argument (None for a bare name like `digits`)."""
    if not data or ":" not in data:
        return None
    _, _, rest = data.partition(":")
    return Path(rest) if rest else None


def _relation(out: Path, other: Path) -> str | None:
    """How resolved `out` overlaps resolved `other`: 'is', 'contains', 'is inside', or None."""
    if out == other:
        return "is"
    if out in other.parents:
        return "contains"
    if other in out.parents:
        return "is inside"
    return None


def _is_leftover(entry: Path) -> bool:
    return any(entry.match(pattern) for pattern in LEFTOVER_PATTERNS)


def _check_inputs(out: Path, resolved: Path, inputs: Iterable[PathLike | None]) -> None:
    for item in inputs:
        if item is None or str(item) == "":
            continue
        relation = _relation(resolved, Path(item).resolve())
        if relation is not None:
            raise CstarError(f"--out {out} {relation} the input {item}: writing there would destroy or mix "
                             "the stage's own input",
                             "pass an --out outside every input directory (--force never replaces an input)")


def check_output(out: PathLike, stage: str, inputs: Iterable[PathLike | None] = (), *, force: bool = False,
                 resumable: bool = False, own_files: Iterable[str] = ()) -> Path:
    """Refuse an `--out` the rule forbids (read-only: nothing is created); returns its resolved path.

    `resumable`: a finished directory of `stage` itself is accepted (the stage decides what to do
    with it); `own_files` names entries of an unfinished directory of `stage` that are not user data.
    """
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise CstarError(f"--out {out} exists and is not a directory", "pass a directory path for --out")
    resolved = path.resolve()
    _check_inputs(path, resolved, inputs)
    if not path.is_dir():
        return resolved
    existing = artifact_stage(path)
    if existing is None:
        own = set(own_files)
        foreign = sorted(e.name for e in path.iterdir() if e.name not in own and not _is_leftover(e))
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise CstarError(f"--out {out} is not empty ({shown}) and holds no cstar stage artifact",
                             "pass a new or empty directory for --out (nothing there is replaced, not even "
                             "with --force)")
        return resolved
    if existing != stage:
        raise CstarError(f"--out {out} holds a finished '{existing}' artifact; this is the {stage} stage",
                         "pass another --out (--force only replaces a directory of the same stage)")
    if not resumable and not force:
        raise CstarError(f"--out {out} already holds a finished {stage} artifact",
                         "pass another --out, or --force to replace it (the old one is kept until the new "
                         "one is complete)")
    return resolved


def check_output_file(out: PathLike, inputs: Iterable[PathLike | None] = (), *, force: bool = False,
                      kind: str | None = None) -> Path:
    """The rule for a stage whose --out is one file (`cstar profile`'s latency table).

    Refused: a directory; the input itself or a file inside an input directory; a file inside
    another stage's finished directory; an existing file unless `force`, and even with `force` one
    that is not a JSON document of `kind` (user data is never replaced). The write itself is atomic.
    """
    path = Path(out)
    if path.is_dir():
        raise CstarError(f"--out {out} is a directory", "pass a file path for --out, e.g. OUT_DIR/table.json")
    resolved = path.resolve()
    _check_inputs(path, resolved, inputs)
    stage = artifact_stage(resolved.parent)
    if stage is not None:
        raise CstarError(f"--out {out} lies inside a finished '{stage}' directory ({resolved.parent})",
                         "write the file outside every stage directory (stages never change one another's)")
    if path.exists():
        if not force:
            raise CstarError(f"--out {out} already exists", "pass another --out, or --force to replace it")
        if kind is not None and _json_kind(path) != kind:
            raise CstarError(f"--out {out} exists and is not a {kind} file: it is not replaced, even with --force",
                             "pass another --out")
    return resolved


def _json_kind(path: Path) -> str | None:
    """The `kind` key of a JSON object file (None when unreadable or absent)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    kind = data.get("kind") if isinstance(data, dict) else None
    return kind if isinstance(kind, str) else None


def _sibling(out: Path, tag: str) -> Path:
    return out.parent / f".{out.name}{tag}{os.getpid()}-{secrets.token_hex(4)}"


def lock_path(out: PathLike) -> Path:
    """The lock file of `out`: a hidden sibling, so it never appears inside the artifact."""
    path = Path(out).resolve()
    return path.parent / f".{path.name}.lock"


def _unwritable(out: Path, exc: OSError) -> CstarError:
    where = exc.filename or out
    return CstarError(f"cannot write --out {out}: {exc.strerror or exc} ({where})",
                      "pass an --out in a directory you can write, or fix its permissions")


def _acquire_lock(out: Path) -> int:
    """Open and flock (non-blocking) the sibling lock file; a held lock is a concurrent writer."""
    lock = lock_path(out)
    for _ in range(5):
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise _unwritable(out, exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CstarError(f"another cstar process is writing --out {out} (its lock {lock} is held)",
                             "wait for that run to finish, or pass another --out") from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a lock file its previous holder unlinked while we opened it
            return fd
        os.close(fd)
    raise CstarError(f"could not take the lock {lock} of --out {out}", "retry; if it persists, pass another --out")


def _release_lock(out: Path, fd: int) -> None:
    with contextlib.suppress(OSError):
        lock_path(out).unlink()
    os.close(fd)


def clean_stale(out: PathLike) -> list[Path]:
    """Remove temporaries of earlier writers of `out` (call with its lock held); returns what went.

    A `.old-` sibling while `out` itself is missing is a swap a crash interrupted: it is put back.
    """
    path = Path(out).resolve()
    removed: list[Path] = []
    prefix = glob.escape(f".{path.name}")
    olds = sorted(path.parent.glob(f"{prefix}{OLD_TAG}*"), key=lambda p: p.stat().st_mtime)
    if olds and not path.exists():
        os.rename(olds.pop(), path)
    stale = [*path.parent.glob(f"{prefix}{TMP_TAG}*"), *olds]
    if path.is_dir():
        stale += [e for e in path.iterdir() if _is_leftover(e)]
    for entry in stale:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def clean_orphans(parent: PathLike) -> list[Path]:
    """Remove other outputs' temporaries in `parent` whose writer is dead here and whose lock is free.

    Both conditions: a pid alone could belong to another host sharing the folder, a free lock alone
    to a writer between its lock and its mkdir. Returns what went.
    """
    removed: list[Path] = []
    for entry in Path(parent).glob(f".*{TMP_TAG}*"):
        name, _, tail = entry.name[1:].rpartition(TMP_TAG)
        pid = tail.split("-", 1)[0]
        if not name or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        owner = entry.parent / name
        try:
            fd = _acquire_lock(owner)
        except CstarError:
            continue
        try:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
        finally:
            _release_lock(owner, fd)
    return removed


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass
class OutputDir:
    """A stage's claim on its `--out`: checked on creation, locked and staged by `open()`.

    Use as a context manager (`with OutputDir(...) as work:` writes into `work`; a clean exit
    publishes, an exception discards), or call open/publish/discard explicitly.
    """

    out: Path
    stage: str
    inputs: tuple[PathLike | None, ...] = ()
    force: bool = False
    resumable: bool = False
    own_files: tuple[str, ...] = ()
    in_place: bool = False
    work: Path | None = field(default=None, init=False)
    _fd: int | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.inputs = tuple(self.inputs)
        self.own_files = tuple(self.own_files)
        self._check()

    def _check(self) -> None:
        check_output(self.out, self.stage, self.inputs, force=self.force, resumable=self.resumable,
                     own_files=self.own_files)

    def open(self) -> Path:
        """Lock, re-check, clean stale temporaries and return the directory to write into."""
        if self.work is not None:
            return self.work
        self._fd = _acquire_lock(self.out)
        try:
            self._check()  # another writer may have published between the first check and the lock
            clean_stale(self.out)
            clean_orphans(self.out.resolve().parent)
            if self.resumable or self.in_place:
                self.work = self.out  # created by the stage's first write: a refused run leaves nothing
            else:
                work = _sibling(self.out, TMP_TAG)
                work.mkdir()
                self.work = work
        except OSError as exc:
            self._release()
            raise _unwritable(self.out, exc) from exc
        except BaseException:
            self._release()
            raise
        return self.work

    def publish(self) -> Path:
        """Rename the finished temporary into place (swapping out a replaced one); returns `out`."""
        if self.work is None:
            raise RuntimeError("OutputDir.publish() before open()")
        try:
            if self.work != self.out:
                self._swap_in(self.work)
        finally:
            self.work = None
            self._release()
        return self.out

    def _swap_in(self, work: Path) -> None:
        try:
            if self.out.exists() or self.out.is_symlink():
                old = _sibling(self.out, OLD_TAG)
                os.rename(self.out, old)
                try:
                    os.rename(work, self.out)
                except BaseException:
                    os.rename(old, self.out)
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(work, self.out)
        except OSError as exc:
            shutil.rmtree(work, ignore_errors=True)
            raise _unwritable(self.out, exc) from exc
        _fsync_dir(self.out.parent)

    def discard(self) -> None:
        """Drop the temporary (never `out`) and release the lock; safe to call twice."""
        if self.work is not None and self.work != self.out:
            shutil.rmtree(self.work, ignore_errors=True)
        self.work = None
        self._release()

    def _release(self) -> None:
        if self._fd is not None:
            _release_lock(self.out, self._fd)
            self._fd = None

    def __enter__(self) -> Path:
        return self.open()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if kind is None:
            self.publish()
        else:
            self.discard()


def writing_rank() -> bool:
    """True in the process that writes outputs: rank 0 under torchrun ($RANK, set before the group exists)."""
    return os.environ.get("RANK", "0").strip() in ("", "0")


@contextlib.contextmanager
def holding(claim: OutputDir | None, fallback: PathLike) -> Iterator[Path]:
    """`with claim` when there is one (the writing rank), else just `fallback` (ranks that never write)."""
    if claim is None:
        yield Path(fallback)
        return
    with claim as work:
        yield work
