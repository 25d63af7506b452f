"""What a process learns from its launcher before any MPI call: whether mpiexec started it (and as which
rank), where mpiexec is, how to start a child that is not a rank, and the cleanup of MPICH's shared memory
that an abort would leave behind. minimlp.parallel.distributed builds the world on it.
"""
import os
import shutil
import sys
from pathlib import Path

# Set by mpiexec in every rank: MPICH/Intel MPI (Hydra's PMI), Open MPI, and PMIx launchers (Slurm's srun).
MPI_ENVIRONMENT = ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK")


def launched_by_mpi(environ=None):
    environ = os.environ if environ is None else environ
    return any(name in environ for name in MPI_ENVIRONMENT)


def environment_without_mpi(environ=None):
    """A copy of the environment without the launcher's variables: a child started from a rank with it is a
    plain process, not taken for a rank."""
    environ = os.environ if environ is None else environ
    return {key: value for key, value in environ.items() if key not in MPI_ENVIRONMENT}


def mpiexec():
    """The mpiexec of the MPI that mpi4py uses: the mpich wheel's, beside this Python (pip puts it there,
    whether or not that folder is on PATH), else the first on PATH; None when there is none."""
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.is_file() else shutil.which("mpiexec")


def rank_from_environment(environ=None):
    """This process's rank as the launcher's variables tell it (before any MPI call), 0 when they do not."""
    environ = os.environ if environ is None else environ
    for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        if environ.get(name, "").isdigit():
            return int(environ[name])
    return 0


def mapped_mpich_segments(maps="/proc/self/maps"):
    """The MPICH shared-memory files (/dev/shm/mpich_shm_*) this process has mapped and that still have a name."""
    try:
        lines = Path(maps).read_text().splitlines()
    except OSError:  # not Linux
        return []
    paths = {line.split(maxsplit=5)[5] for line in lines if len(line.split(maxsplit=5)) == 6}
    return sorted(path for path in paths if path.startswith("/dev/shm/mpich_shm_") and not path.endswith("(deleted)"))


def unlink_shared_memory(local):
    """MPICH keeps the name of its shared-memory segment (/dev/shm/mpich_shm_*, 2.1 MB per machine) until
    MPI_Finalize: every job that ends in an abort or a kill -9 would leave one behind, and ~30 fill Docker's
    64 MB /dev/shm. MPI_Init maps it in every rank of the machine; once they all have (the barrier over the
    machine's ranks, `local`), its first rank removes the name. The memory stays the ranks' until they end,
    however they end, and the kernel frees it then."""
    local.Barrier()
    if local.Get_rank() == 0:
        for path in mapped_mpich_segments():
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
