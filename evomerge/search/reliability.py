"""What keeps a search going on real clusters: heartbeats that let any process recover a dead one's trial,
a lock so one run name has one `search` process, retries when the database goes away, and storage URLs
that never show a password.

Heartbeats are a user attribute (`heartbeat`, a UNIX time) that a thread refreshes while a trial is
evaluated, so they work on any Optuna storage (SQLite, PostgreSQL, ...). A RUNNING trial whose process on
this host is gone, or whose last heartbeat (before the first one: its start) is older than the grace period,
is marked FAIL with its reason by the next process that looks (every `search` and `worker` looks before
each candidate). A live process on this host always answers for its own trials.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import optuna

from ..errors import EvomergeError

log = logging.getLogger(__name__)
T = TypeVar("T")

HEARTBEAT_SECONDS = 10.0
GRACE_FACTOR = 3  # a trial is dead after this many missed heartbeats
RETRY_DELAYS = (1, 2, 4, 8, 16, 30, 30)  # seconds between storage retries (~1.5 min in all)


class StorageUnavailable(EvomergeError):
    """The study's database stayed unreachable through every retry."""


# ---- storage URLs -----------------------------------------------------------------------------------------
def storage_url(url: str | None) -> str | None:
    """The URL SQLAlchemy should use: `postgresql://` means psycopg 3 (the `[postgres]` extra), whichever
    default driver the installed SQLAlchemy has."""
    if url and url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


def redact(url: str | None) -> str | None:
    """The URL with its password replaced by ***, for everything evomerge writes or prints."""
    if not url:
        return url
    try:
        import sqlalchemy

        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy can parse: show only the scheme
        return url.split("://", 1)[0] + "://***"


def read_storage(url: str | None, url_file: str | None) -> str | None:
    """--storage-file (its first line), else --storage, else $EVOMERGE_STORAGE: a password need not appear on
    the command line, where every local user can read it in the process list."""
    if url_file:
        try:
            return Path(url_file).read_text().strip().splitlines()[0].strip()
        except (OSError, IndexError) as e:
            raise EvomergeError(f"--storage-file {url_file}: cannot read a URL from it ({e})") from None
    return url or os.environ.get("EVOMERGE_STORAGE") or None


# ---- retries ----------------------------------------------------------------------------------------------
def root_cause(error: BaseException) -> BaseException:
    """The innermost exception of a chain: the driver's "server closed the connection", not Optuna's wrapper."""
    seen = {id(error)}
    while (nxt := error.__cause__ or error.__context__) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        error = nxt
    return error


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none): drivers write several."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def check_storage(url: str) -> None:
    """Connect once, so an unreachable database or a wrong URL is one line before the models load."""
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(url)
        with engine.connect():
            pass
        engine.dispose()
    except Exception as e:  # sqlalchemy and its drivers raise many types; the first line names the cause
        raise EvomergeError(f"storage {redact(url)}: cannot connect ({type(e).__name__}: {first_line(e)})") from None


def is_storage_error(error: BaseException) -> bool:
    import sqlalchemy.exc

    return (
        isinstance(error, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError))
        or isinstance(
            root_cause(error), (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, ConnectionError)
        )
        or type(error).__name__ == "StorageInternalError"
    )


def with_retries(action: Callable[[], T], what: str, delays: tuple[float, ...] = RETRY_DELAYS) -> T:
    """Run `action`; while the storage is unreachable, wait and try again (bounded); then one clear error."""
    for attempt in range(len(delays) + 1):
        try:
            return action()
        except Exception as e:
            if not is_storage_error(e):
                raise
            cause = root_cause(e)
            reason = first_line(cause)
            if attempt == len(delays):
                raise StorageUnavailable(
                    f"{what}: the study's database is unreachable ({type(cause).__name__}: {reason}); "
                    f"gave up after {len(delays)} retries over {sum(delays):.0f} s"
                ) from None
            log.warning("%s: database unreachable (%s); retrying in %g s", what, reason, delays[attempt])
            time.sleep(delays[attempt])
    raise AssertionError("unreachable")


# ---- a storage that retries ------------------------------------------------------------------------------
class RetryingStorage(optuna.storages.BaseStorage):
    """An Optuna storage whose every call is retried while the database is unreachable (`with_retries`), so no
    caller needs its own retry loop. A write that reached the database before its connection broke may
    raise when retried (a trial told twice, a second trial created): the search loop and the stale-trial
    recovery handle both."""

    def __init__(self, inner: optuna.storages.BaseStorage) -> None:
        self._inner = inner

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


def _retried(name: str) -> Callable:
    def method(self, *args, **kwargs):
        return with_retries(lambda: getattr(self._inner, name)(*args, **kwargs), f"storage ({name})")

    method.__name__ = name
    return method


for _name in dir(optuna.storages.BaseStorage):
    if not _name.startswith("_") and callable(getattr(optuna.storages.BaseStorage, _name)):
        setattr(RetryingStorage, _name, _retried(_name))
RetryingStorage.__abstractmethods__ = frozenset()


def open_storage(url: str) -> RetryingStorage:
    """Optuna's RDB storage (with its trial cache) behind retries; SQLite waits up to a minute for a lock."""
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    inner = with_retries(lambda: optuna.storages.RDBStorage(url, engine_kwargs=kwargs), "opening the study's storage")
    return RetryingStorage(optuna.storages.get_storage(inner))


# ---- heartbeats and stale trials --------------------------------------------------------------------------
class Heartbeat:
    """Calls `beat` now and then every `interval` seconds from a thread, until stopped: a trial's `heartbeat`
    attribute while its candidate is evaluated, or the study's `search_heartbeat` while a search runs."""

    def __init__(self, beat: Callable[[], None], interval: float, now: bool = True) -> None:
        self.beat, self.interval = beat, interval
        self._stop = threading.Event()
        if now:
            beat()
        self._thread = threading.Thread(target=self._run, name="evomerge-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except Exception as e:  # finished by another process, or the database is down: the loop decides
                log.debug("heartbeat not recorded: %s", e)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def trial_heartbeat(study: optuna.Study, trial_id: int, interval: float) -> Heartbeat:
    """The first beat comes after `interval`: until then the trial is covered by its start time (and its process,
    on this host), so a short candidate costs no extra write."""
    beat = lambda: study._storage.set_trial_user_attr(trial_id, "heartbeat", time.time())  # noqa: E731
    return Heartbeat(beat, interval, now=False)


def stale_reason(trial: optuna.trial.FrozenTrial, interval: float, now: float | None = None) -> str | None:
    """Why a RUNNING trial is dead, or None while it may be alive. A trial's first heartbeat comes one interval
    after it starts; one with none three intervals after it was asked was lost (its process killed, or the
    database gone, between the ask and the first beat)."""
    now = time.time() if now is None else now
    grace = GRACE_FACTOR * interval
    host, pid, beat = trial.user_attrs.get("host"), trial.user_attrs.get("pid"), trial.user_attrs.get("heartbeat")
    if host == socket.gethostname() and pid is not None:  # on this host the process itself answers
        return None if _alive(pid) else f"its process {host}:{pid} is gone"
    if beat is not None and now - float(beat) > grace:
        return f"no heartbeat from {host}:{pid} for {now - float(beat):.0f} s"
    asked = trial.datetime_start.timestamp() if trial.datetime_start else None
    if beat is None and asked is not None and now - asked > grace:
        return f"no heartbeat since it was asked {now - asked:.0f} s ago"
    return None


def settle(study: optuna.Study, interval: float) -> bool:
    """Wait (at most one grace period and a heartbeat) until no trial is RUNNING, recovering dead ones; True
    when none is left. The process that finishes a study uses it before writing the final report."""
    deadline = time.time() + (GRACE_FACTOR + 1) * interval
    while True:
        fail_stale_trials(study, interval)
        if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            return True
        if time.time() > deadline:
            return False
        time.sleep(interval / 2)


def fail_stale_trials(study: optuna.Study, interval: float) -> list[optuna.trial.FrozenTrial]:
    """Mark dead processes' RUNNING trials FAIL, with the reason in `fail_reason`; returns them."""
    failed = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        reason = stale_reason(t, interval)
        if reason is None:
            continue
        try:
            study._storage.set_trial_user_attr(t._trial_id, "fail_reason", f"abandoned: {reason}")
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            failed.append(t)
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError, RuntimeError):
            pass  # another process recovered it first
    return failed


def _alive(pid: int | str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError):
        return False
    return int(pid) > 0


# ---- one search process per run name ----------------------------------------------------------------------
def me() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@contextlib.contextmanager
def run_lock(run_dir: Path, study: optuna.Study, interval: float) -> Iterator[None]:
    """Held by `evomerge search` for its lifetime, so a second `search` of the same run refuses with one line
    (workers share the study on purpose and do not take it): a lock file for processes on this machine, and
    a claim with a heartbeat in the study for processes elsewhere on the same database."""
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    fh = open(run_dir / ".search.lock", "a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            _refuse(study.study_name, fh.read().strip() or "another process")
        owner, beat = study.user_attrs.get("search_owner"), study.user_attrs.get("search_heartbeat")
        elsewhere = owner and owner.rsplit(":", 1)[0] != socket.gethostname()  # on this host the file lock decides
        if elsewhere and beat is not None and time.time() - float(beat) <= GRACE_FACTOR * interval:
            _refuse(study.study_name, owner)
        fh.seek(0)
        fh.truncate()
        fh.write(me())
        fh.flush()
        study.set_user_attr("search_owner", me())
        claim = Heartbeat(lambda: study.set_user_attr("search_heartbeat", time.time()), interval)
        try:
            yield
        finally:
            claim.stop()
            with contextlib.suppress(Exception):
                study.set_user_attr("search_owner", "")
    finally:
        fh.close()


def _refuse(name: str, holder: str) -> None:
    raise EvomergeError(
        f"run {name!r} is being searched by {holder}; wait for it, choose another --name, "
        "or join it with `evomerge worker`"
    )
