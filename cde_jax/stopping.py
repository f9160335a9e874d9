"""How a CLI command stops: on a signal, on an error, or when a peer of a multi-process run
is lost; each way with its exit status and one line.

SIGTERM and SIGHUP (a scheduler, a preemption) stop a command as Ctrl-C does
(`stop_signals`). In a multi-process run every process watches its peers (`PeerWatch`,
started by `distributed.initialize`) through the coordination service's key-value store: a
peer that stops answering for `--peer-timeout` seconds, or that stops on an error or a
signal, ends every other process with one line. `end` is the command's way out, and in a
multi-process run it tells the others. What JAX itself would do instead (abort with a C++
stack dump) is kept away by `_jax_compat`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import sys
import threading
import time
import traceback

import jax

from . import _jax_compat

PEER_LOST = 3  # exit status of the processes that outlive a peer that stopped answering
STOP_GRACE = 5.0  # seconds a process has to stop by itself after a peer stopped on an error
INTERRUPTED = "interrupted: run the same command again to resume"
TERMINATED = "terminated: run the same command again to resume"
_KEYS = "cde_jax/"  # this package's keys in the coordination service's store


@dataclasses.dataclass(frozen=True)
class Stop:
    """How a process leaves the run: its exit status and its line."""

    code: int
    line: str | None


def signal_stop(signum: int) -> Stop:
    """How a process stops on a signal: Ctrl-C 130, SIGTERM 143, SIGHUP 129."""
    return Stop(128 + signum, INTERRUPTED if signum == signal.SIGINT else TERMINATED)


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived. Not an `Exception`, as KeyboardInterrupt is not: no
    `except Exception` on the way out swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def say(program: str, line: str, *, from_thread: bool = False) -> None:
    """`program: line` on stderr. From the watching thread, a progress bar may be half
    drawn on the current line: a terminal's line is cleared first, a file's ended."""
    start = ("\r\x1b[K" if sys.stderr.isatty() else "\n") if from_thread else ""
    print(f"{start}{program}: {line}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class Ending:
    """One command's way out, held while it runs (`stop_signals`): the stop signal it
    received, whether it is already ending (a signal then is only noted), and its watch
    over the peers in a multi-process run."""

    signalled: int | None = None
    ending: bool = False
    watch: PeerWatch | None = None


_command: Ending | None = None  # the command running in this process, if any


@contextlib.contextmanager
def stop_signals():
    """SIGTERM and SIGHUP raise `Terminated` in the main thread, as SIGINT raises
    KeyboardInterrupt. The first of the three ignores the next ones, so that a second signal
    does not break the stop it started; one that comes while the command is already ending
    (`end`) is only noted: it explains a failed collective."""
    global _command
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    ending, outer = Ending(), _command

    def stop(signum, frame):
        for s in stops:
            signal.signal(s, signal.SIG_IGN)
        ending.signalled = signum
        if not ending.ending:
            raise KeyboardInterrupt if signum == signal.SIGINT else Terminated(signum)

    saved = {s: signal.signal(s, stop) for s in stops}
    _command = ending
    try:
        yield
    finally:
        _command = outer
        for s, handler in saved.items():
            signal.signal(s, handler)


def watch_peers(watch: PeerWatch) -> None:
    """Starts the watch over the peers (`distributed.initialize`) and hands it to the
    running command."""
    watch.start()
    if _command is not None:
        _command.watch = watch


def end(program: str, code: int, line: str | None = None,
        error: BaseException | None = None) -> int:
    """The end of a CLI command: prints `program: line` and returns `code`. In a
    multi-process run this process also tells the others (`PeerWatch.end`); an unexpected
    `error` there is first explained by what happened to a peer, if anything did."""
    ending = _command or Ending()
    ending.ending = True
    try:
        if ending.watch is not None:
            return ending.watch.end(code, line, error, ending.signalled)
        if error is not None:
            raise error
        if line:
            say(program, line)
        return code
    finally:
        ending.ending = False


class PeerWatch(threading.Thread):
    """This process in a multi-process CLI run, and the thread that watches its peers.

    Every `interval` it writes its heartbeat into the coordination service's store and reads
    the others': a peer whose heartbeat has not moved for `timeout` seconds (killed, hung, its
    host gone) or that left with an error or a signal (its stop record) is a verdict. The
    main thread, when the command fails on its own, takes the verdict (a failed collective
    means a peer is gone); otherwise this thread ends the process with the verdict's line
    (a peer that stopped on an error or a signal gets `STOP_GRACE` seconds first, in which
    this process may stop the same way by itself). Whoever takes `_leaving` first speaks.
    Process 0 holds the `coordinator`, released when the run is over."""

    def __init__(self, client, me: int, n: int, timeout: float, program: str, resume: str,
                 coordinator: _jax_compat.Coordinator | None):
        super().__init__(name="cde-jax-peers", daemon=True)
        self.client, self.me, self.n, self.timeout = client, me, n, timeout
        self.program, self.resume, self.coordinator = program, resume, coordinator
        self.interval = min(1.0, timeout / 10)
        self.verdict: Stop | None = None
        self.decided, self.quit, self._leaving = threading.Event(), threading.Event(), \
            threading.Lock()
        self.gone: dict[int, Stop] = {}  # peers that left or stopped answering
        self._beats: dict[int, tuple[str | None, float]] = {}
        self._count, self._contact = 0, time.monotonic()

    def run(self) -> None:
        while not self.quit.wait(self.interval):
            self.poll()
            if self.verdict is not None and self.verdict.code != PEER_LOST:
                time.sleep(STOP_GRACE)
            if self.verdict is not None and self._leaving.acquire(blocking=False):
                say(self.program, self.verdict.line, from_thread=True)
                self.leave(self.verdict.code, self.verdict.line)

    def poll(self) -> None:
        """One heartbeat out, everyone's in; updates `gone` and the verdict."""
        now = time.monotonic()
        self._count += 1
        try:
            self.client.key_value_set(f"{_KEYS}beat/{self.me}", str(self._count),
                                      allow_overwrite=True)
            found = dict(self.client.key_value_dir_get(_KEYS))
        except Exception:  # the service does not answer: process 0's host is gone
            if now - self._contact > self.timeout:
                self._decide(0, self._lost(0))
            return
        self._contact = now
        for peer in set(range(self.n)) - {self.me} - set(self.gone):
            stop = found.get(f"{_KEYS}stop/{peer}")
            beat = found.get(f"{_KEYS}beat/{peer}")
            if stop is not None:
                self._decide(peer, self._stopped(peer, Stop(**json.loads(stop))))
            elif peer not in self._beats or self._beats[peer][0] != beat:
                self._beats[peer] = (beat, now)
            elif now - self._beats[peer][1] > self.timeout:
                self._decide(peer, self._lost(peer))

    def _decide(self, peer: int, stop: Stop) -> None:
        self.gone[peer] = stop
        if self.verdict is None and stop.code != 0:
            self.verdict = stop
            self.decided.set()

    def _lost(self, peer: int) -> Stop:
        who = "process 0 (the coordinator)" if peer == 0 and self.me != 0 else f"process {peer}"
        return Stop(PEER_LOST, f"error: {who} stopped answering (nothing from it for "
                               f"{self.timeout:g} s); {self.resume}")

    def _stopped(self, peer: int, stop: Stop) -> Stop:
        """What this process says when `peer` stopped: a signal, the same; an error, that."""
        if stop.line in (INTERRUPTED, TERMINATED) or stop.code == 0:
            return stop
        return Stop(stop.code, f"error: process {peer} stopped with an error (see its "
                               f"messages); {self.resume}")

    def end(self, code: int, line: str | None, error: BaseException | None,
            signalled: int | None) -> int:
        """The main thread's end of the run: says `line` (an `error` the command did not
        expect is explained by a peer's verdict when one comes, or by the stop `signalled`
        as the run was stopping; else it is a bug and shows its traceback), then leaves."""
        self._leaving.acquire()  # if this thread's verdict won, the process is exiting
        if error is not None:
            if self.decided.wait(self.timeout + 3 * self.interval):
                code, line = self.verdict.code, self.verdict.line
            elif signalled is not None:
                code, line = dataclasses.astuple(signal_stop(signalled))
            else:
                traceback.print_exception(error)
        if line:
            say(self.program, line)
        return self.leave(code, line)

    def leave(self, code: int, line: str | None = None) -> int:
        """Records this process's stop for the others. Success: leaves the distributed
        runtime (its shutdown barrier waits for every process), then process 0 releases the
        service. Failure: exits at once; process 0 first waits until the others have
        stopped or are silent, then releases the service."""
        with contextlib.suppress(Exception):
            said = line if line in (INTERRUPTED, TERMINATED) else None
            self.client.key_value_set(f"{_KEYS}stop/{self.me}", json.dumps(
                dataclasses.asdict(Stop(code, said))), allow_overwrite=True)
        self.quit.set()
        if threading.current_thread() is not self:
            self.join()
        if code == 0:
            jax.distributed.shutdown()
        elif self.me == 0:
            give_up = time.monotonic() + self.timeout + 3 * self.interval
            while len(self.gone) < self.n - 1 and time.monotonic() < give_up:
                time.sleep(self.interval)
                self.poll()
        if self.coordinator is not None:
            self.coordinator.release()
        if code == 0:
            return 0
        _jax_compat.exit_now(code)
