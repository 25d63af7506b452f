"""Progress that reads well both on a terminal and in a log file.

    progress = Progress(total=len(loader), desc="epoch 3/15", unit="batch", every=20)
    for ...:
        progress.update(1, loss="1.2345", lr="2.9e-03")   # the postfix stays until it is given again
    progress.close()
    write("warning: skipping unreadable image x.jpg (truncated)")   # always a line of its own

On a terminal (the bar's stream is a tty) this is a tqdm bar. Anywhere else (output redirected to a
file, a pipe, a CI log) tqdm would leave `\\r` fragments and blank lines, so plain lines are printed
instead, each a whole line, one every `every` steps, one whenever `seconds` (10) have passed since the
last, and one when the total is reached:

    epoch 3/15  20/40 batch  9.8 s  eta 9.8 s  loss 1.2345  lr 2.9e-03

`write(line)` prints a line above any open bar (tqdm.write) on a terminal and as a plain line
elsewhere. Before writing to one standard stream it flushes the other: stdout is block-buffered when
redirected and stderr is not, so without this a log of both (`> log 2>&1`) comes out of order.
"""
import errno
import os
import sys
import termios
import time

from tqdm import tqdm

PLAIN_LINES_PER_TOTAL = 10  # plain lines per total when `every` is not given
PLAIN_LINE_SECONDS = 10.0  # and at least one line this often, however long a step takes


def is_terminal(stream):
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def let_go_of_a_lost_terminal():
    """After a hangup (SIGHUP: the terminal closed, an ssh connection dropped), every write to the terminal
    fails (EIO). Point the standard streams that were that terminal at /dev/null, as nohup does, so that
    the run can still save its checkpoint and its log line; output redirected to a file, and a terminal
    that is still there (a SIGHUP sent with kill), are left as they are."""
    for descriptor in (1, 2):
        try:
            termios.tcgetattr(descriptor)
        except termios.error as error:
            if error.args[0] == errno.EIO:  # a terminal that hung up (not a terminal: ENOTTY)
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, descriptor)
                os.close(null)


def write(line, file=None):
    """Print `line` as a line of its own on `file` (default sys.stderr: warnings such as skipped images or
    skipped AMP steps), never glued onto a progress bar."""
    file = file if file is not None else sys.stderr
    line = str(line).rstrip("\n")
    if is_terminal(file):
        tqdm.write(line, file=file)  # clears the open bars, writes the line, redraws them below it
    else:
        _flush_standard_streams()
        file.write(line + "\n")
    file.flush()


def _flush_standard_streams():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, ValueError, OSError):  # replaced by an object without flush, or closed
            pass


class Progress:
    """Progress through `total` steps: a tqdm bar on a terminal, plain lines elsewhere.

    desc:    what is counted, first on every line ("epoch 3/15", "eval").
    unit:    the step's name ("batch", "image").
    initial: steps already done (a resumed epoch starts at its next batch).
    every:   plain mode: a line at every multiple of this many steps (default: about
             PLAIN_LINES_PER_TOTAL lines per total); 0 = none but the one printed when the total is reached.
    seconds: plain mode: also a line at the first step after this many seconds without one (default
             PLAIN_LINE_SECONDS; 0 = never), so a long epoch of few steps is never silent.
    leave:   terminal mode: keep the finished bar on screen (default: clear it).
    file:    the stream (default sys.stderr). interactive: force bar (True) or plain (False) mode;
             default: bars exactly when `file` is a terminal.
    """

    def __init__(self, total, desc, unit="batch", initial=0, every=None, seconds=None, leave=False, file=None,
                 interactive=None):
        self.total, self.desc, self.unit = total, desc, unit
        self.file = file if file is not None else sys.stderr
        self.interactive = is_terminal(self.file) if interactive is None else interactive
        self.count = initial
        self.initial = initial
        self.every = max(1, round(total / PLAIN_LINES_PER_TOTAL)) if every is None else every
        self.seconds = PLAIN_LINE_SECONDS if seconds is None else seconds
        self.postfix = {}
        self.started = self.last_line_time = time.perf_counter()
        self.last_printed = initial
        self.closed = False
        self.bar = None
        if self.interactive:
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=leave,
                            file=self.file)

    def update(self, n=1, **postfix):
        """Count n more steps (n = 0 only sets the postfix). postfix: name=value pairs shown after the count;
        they replace the earlier values of the same names. Give them in the update that counts the step, so
        that a plain line printed by this update shows them."""
        self.postfix.update(postfix)
        self.count += n
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix({name: _text(value) for name, value in self.postfix.items()}, refresh=False)
            self.bar.update(n)
            if postfix:
                self.last_line_time = time.perf_counter()
            return
        crossed_a_multiple = self.every and self.count // self.every > self.last_printed // self.every
        if n and (crossed_a_multiple or self.count >= self.total or self.due()):
            self.print_line()

    def due(self):
        """Whether `seconds` have passed since the last line (on a terminal: since the postfix last changed):
        the caller may then bring fresh numbers for the postfix (the trainer reads its loss back)."""
        return bool(self.seconds) and time.perf_counter() - self.last_line_time >= self.seconds

    def set_postfix(self, **postfix):
        self.update(0, **postfix)

    def print_line(self):
        """Plain mode: one line for where the count stands now."""
        elapsed = time.perf_counter() - self.started
        parts = [self.desc, f"{self.count}/{self.total} {self.unit}", f"{elapsed:.1f} s"]
        done = self.count - self.initial
        if 0 < done and self.count < self.total:
            parts.append(f"eta {elapsed / done * (self.total - self.count):.1f} s")
        parts += [f"{name} {_text(value)}" for name, value in self.postfix.items()]
        write("  ".join(parts), self.file)
        self.last_printed = self.count
        self.last_line_time = time.perf_counter()

    def write(self, line, file=None):
        """A line of its own, above the bar (the module's write; default file sys.stderr)."""
        write(line, file)

    def close(self):
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def track(iterable, total, desc, **options):
    """Yield the items of `iterable`, counting one step per item (Progress(total, desc, **options))."""
    with Progress(total, desc, **options) as progress:
        for item in iterable:
            yield item
            progress.update(1)


def _text(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
