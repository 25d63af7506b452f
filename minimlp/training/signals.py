"""How a run stops: the first Ctrl-C, SIGTERM or SIGHUP (what Slurm, Kubernetes and `timeout` send before they
kill) asks the training loop to save after the current step (StopSignals, then Interrupted); a second one quits
at once (QuitAtOnce); outside the loop, SIGTERM and SIGHUP quit as Ctrl-C does (quit_on_stop_signals).
"""
import contextlib
import signal

from .progress import let_go_of_a_lost_terminal, write


# Signals that stop a run: Ctrl-C, and what Slurm, Kubernetes and `timeout` send before they kill.
STOP_SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}
EXIT_WORKER_DIED = 1  # exit code of a run stopped by a loader worker that kept dying (checkpoint saved)


class Interrupted(Exception):
    """The run stopped early and saved a checkpoint. exit_code: 128 + the signal's number, as a shell
    reports a process ended by that signal (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP); EXIT_WORKER_DIED."""

    def __init__(self, message, exit_code=128 + signal.SIGINT):
        super().__init__(message)
        self.exit_code = exit_code


class QuitAtOnce(KeyboardInterrupt):
    """A second stop signal: quit now, without saving (exit_code 128 + its number)."""

    def __init__(self, signum):
        super().__init__(STOP_SIGNALS.get(signum, signal.Signals(signum).name))
        self.exit_code = 128 + signum


@contextlib.contextmanager
def quit_on_stop_signals():
    """Outside the training loop, SIGTERM and SIGHUP quit at once as Ctrl-C does (an exception, so that every
    `finally` runs: workers stopped, temporary files removed, the run folder's lock released)."""
    def quit_now(signum, frame):
        if signum == signal.SIGHUP:
            let_go_of_a_lost_terminal()  # so that saying "interrupted" on a closed terminal cannot fail
        raise QuitAtOnce(signum)

    previous = {number: signal.signal(number, quit_now) for number in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


class StopSignals:
    """While active (`with`), the first Ctrl-C, SIGTERM or SIGHUP only raises a flag: the loop saves a
    checkpoint after the current step and stops (Interrupted). A second one quits at once (QuitAtOnce),
    except inside `with signals.deferred():` (writing checkpoints and the log line), which it lets finish."""

    def __init__(self):
        self.signum = None  # the first stop signal received
        self.agreed = 0  # the stop signal any rank has received (agree), 0 for none
        self.deferring = 0
        self.quit_after = None  # a second signal received while deferring
        self.previous = {}

    @property
    def pressed(self):
        return self.signum is not None

    @property
    def name(self):
        return STOP_SIGNALS.get(self.agreed or self.signum, "")

    def agree(self, world):
        """Data parallel: whether any rank has received a stop signal (mpiexec passes Ctrl-C and SIGTERM on to
        every rank, not at the same instant), so that every rank stops after the same step; a small
        all-reduce (minimlp.parallel.distributed). A rank that takes another's signal treats its own, arriving later,
        as its first."""
        self.agreed = int(world.max(self.signum or 0))
        return self.agreed != 0

    def __enter__(self):
        self.previous = {number: signal.signal(number, self.handle) for number in STOP_SIGNALS}
        return self

    def handle(self, signum, frame):
        if signum == signal.SIGHUP:
            let_go_of_a_lost_terminal()
        if self.signum is None:
            self.signum = signum
            write(f"{STOP_SIGNALS[signum]}: saving a checkpoint after this step (again to quit at once)")
        elif self.deferring:
            self.quit_after = signum
        else:
            raise QuitAtOnce(signum)

    @contextlib.contextmanager
    def deferred(self):
        self.deferring += 1
        try:
            yield
        finally:
            self.deferring -= 1
        if not self.deferring and self.quit_after is not None:
            raise QuitAtOnce(self.quit_after)

    def __exit__(self, *exc_info):
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.previous = {}
