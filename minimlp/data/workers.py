"""Worker processes that report a death instead of waiting for it forever, and that die with their parent.

    pool = WorkerPool(load_batch, workers=4)   # load_batch: a module-level function, picklable tasks
    pool.submit(task); pool.submit(task2)
    result = pool.next_result()               # the result of the oldest task not yet returned
    pool.close()

Why not multiprocessing.Pool: when the out-of-memory killer (or `kill -9`) ends one of its workers, Pool
starts a replacement but the dead worker's task is lost, and whoever waits for that result waits forever.
Here every worker has its own pipe, and the parent waits on the pipe and on the process's sentinel at once,
so a death is seen the moment it happens. The dead worker's tasks (those whose results were not read yet)
go to a new worker in its place: results depend only on the task, so the caller sees exactly what it would
have seen. A task that has killed `attempts` workers in a row (a file that always exhausts memory, say) is
not tried again: WorkerDied names the worker, its pid and how it ended.

Orphans: on Linux a worker asks the kernel for SIGKILL when its parent dies (prctl PR_SET_PDEATHSIG; the
parent is the thread that started it, so a pool is started from the thread that keeps running it, here the
main thread), and checks that the parent it was started by is still there. Everywhere, a worker exits when
its pipe to the parent closes. Workers ignore SIGINT, SIGTERM and SIGHUP, which a terminal, Slurm or
`timeout` send to the whole process group: the parent decides what to do and stops them itself (close()).

'spawn' processes, never forked (the parent may have CUDA initialised); a script that starts a pool needs
the `if __name__ == "__main__":` guard.
"""
import collections
import ctypes
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys

from ..training.progress import write

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Tasks sent down a worker's pipe ahead of its results; the rest wait here. A pipe holds a few small tasks,
# so the parent never blocks sending while the worker blocks sending a large result back.
QUEUED_PER_WORKER = 2
SIGNALS_FOR_THE_PARENT = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class WorkerDied(RuntimeError):
    """A worker process ended without returning its task's result, `attempts` times for the same task."""


class WorkerPool:
    """`workers` processes computing function(task); results come back in submission order.

    name: what a worker is called in messages. attempts: workers one task may take down before WorkerDied.
    """

    def __init__(self, function, workers, name="worker", attempts=3, context=None):
        if workers < 1:
            raise ValueError(f"a WorkerPool needs at least 1 worker, got {workers}")
        self.function, self.name, self.attempts = function, name, attempts
        self.context = context or multiprocessing.get_context("spawn")
        self.processes, self.connections = [None] * workers, [None] * workers
        self.sent = [collections.deque() for _ in range(workers)]  # per worker: [task, deaths] not returned yet
        self.order = collections.deque()  # the worker of each task not returned yet, in submission order
        self.next_worker = 0
        for index in range(workers):
            self.start(index)

    def __len__(self):
        """Tasks submitted and not returned yet."""
        return len(self.order)

    def start(self, index):
        parent_end, child_end = self.context.Pipe()
        process = self.context.Process(target=worker_main, args=(self.function, child_end, os.getpid()),
                                       name=f"{self.name} {index}", daemon=True)
        process.start()
        child_end.close()  # the worker holds the only other end: either side sees EOF when the other one dies
        self.processes[index], self.connections[index] = process, parent_end

    def submit(self, task):
        index = self.next_worker
        self.next_worker = (index + 1) % len(self.processes)
        self.sent[index].append([task, 0])
        if len(self.sent[index]) <= QUEUED_PER_WORKER:
            self.deliver(index, task)
        self.order.append(index)

    def deliver(self, index, task):
        try:
            self.connections[index].send(task)
        except OSError:  # the worker is dead (BrokenPipeError): receive() sees it, replace() sends again
            pass

    def next_result(self):
        """function(task) of the oldest task not yet returned; its exception if it raised one."""
        index = self.order.popleft()
        while True:
            try:
                succeeded, value = self.receive(index)
                break
            except EOFError:
                self.replace(index)
        self.sent[index].popleft()
        if len(self.sent[index]) >= QUEUED_PER_WORKER:
            self.deliver(index, self.sent[index][QUEUED_PER_WORKER - 1][0])
        if not succeeded:
            raise value
        return value

    def receive(self, index):
        """The next message of worker `index`; EOFError when it died before sending it all."""
        connection, process = self.connections[index], self.processes[index]
        multiprocessing.connection.wait([connection, process.sentinel])
        if not connection.poll():  # the process ended with nothing (more) to read
            raise EOFError
        try:
            return connection.recv()
        except (EOFError, OSError):  # died in the middle of sending
            raise EOFError from None

    def replace(self, index):
        """Worker `index` died: start another in its place and send it the dead one's tasks again."""
        process = self.processes[index]
        process.join()
        self.connections[index].close()
        died = f"{self.name} {index} (pid {process.pid}) {how_it_ended(process.exitcode)}"
        self.sent[index][0][1] += 1
        if self.sent[index][0][1] >= self.attempts:
            self.processes[index] = None  # nothing left to stop
            raise WorkerDied(f"{died}; {self.attempts} workers in a row died on this task, so it is not "
                             "tried again")
        write(f"warning: {died}; a new one takes its {len(self.sent[index])} unfinished task(s)")  # never on a bar
        self.start(index)
        for task, _ in list(self.sent[index])[:QUEUED_PER_WORKER]:
            self.deliver(index, task)

    def close(self):
        """Stop every worker now (tasks in flight are dropped)."""
        for process in self.processes:
            if process is not None and process.is_alive():
                process.kill()  # workers ignore SIGTERM (it may have been sent to the whole group)
        for index, process in enumerate(self.processes):
            if process is not None:
                process.join()
                self.connections[index].close()
        self.processes = [None] * len(self.processes)
        self.order.clear()


def how_it_ended(exitcode):
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        why = " (the out-of-memory killer, or kill -9)" if -exitcode == signal.SIGKILL else ""
        return f"was killed by {name}{why}"
    return f"exited with code {exitcode}"


def worker_main(function, connection, parent_pid):
    """A worker's life: tasks from the pipe, function(task) back as (True, result) or (False, exception)."""
    die_with_parent(parent_pid)
    while True:
        try:
            task = connection.recv()
        except (EOFError, OSError):  # the parent closed the pipe, or died
            return
        try:
            message = (True, function(task))
        except Exception as error:
            message = (False, error)
        try:
            connection.send(message)
        except (BrokenPipeError, EOFError):
            return
        except Exception as error:  # an exception that does not pickle
            connection.send((False, RuntimeError(f"{type(error).__name__}: {error}")))


def die_with_parent(parent_pid):
    for number in SIGNALS_FOR_THE_PARENT:
        signal.signal(number, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
