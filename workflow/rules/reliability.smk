# Start-up checks, run by the main Snakemake process (not by its job processes) before Snakemake locks the
# working directory and plans its jobs:
#
# 1. Stale locks. A Snakemake process killed hard (SIGKILL, power loss) leaves .snakemake/locks/ behind, and the next
#    run fails with "Directory cannot be locked" until `snakemake --unlock`. Every Snakemake process of this workflow
#    holds a shared flock on .snakemake/suite.flock for its lifetime (the kernel drops it when the process dies, however
#    it dies). A process that can take the lock exclusively knows no other one is running in this directory, so any
#    Snakemake locks are stale: it removes them, with one warning line. While another process runs, locks are left
#    alone and Snakemake refuses to start on overlapping outputs, as it should.
# 2. Corrupt files. Results files (results/runs, results/calibrations) that are unreadable or fail validation, and
#    final models that are not complete torch files, are moved to results/corrupt/ with one warning line each, so
#    Snakemake trains them again; corrupt specs are rewritten from the workflow's own (see common.results).
import fcntl
import os

from common.results import recover_results


def hold_working_directory() -> int:
    """Take the shared lock every Snakemake process of this workflow holds; remove stale Snakemake locks first when no
    other process holds it. Returns the lock's file descriptor (kept open for the life of this process)."""
    os.makedirs(".snakemake", exist_ok=True)
    fd = os.open(".snakemake/suite.flock", os.O_RDWR | os.O_CREAT, 0o666)  # not inherited by jobs (O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pass  # another Snakemake process of this workflow runs here: its locks are live
    else:
        stale = sorted(Path(".snakemake/locks").glob("*.lock"))
        for lock in stale:
            lock.unlink(missing_ok=True)
        if stale:
            print(f"warning: removed the stale Snakemake lock left in {Path.cwd() / '.snakemake' / 'locks'} by a "
                  f"killed or crashed run (no other Snakemake process runs in this directory)", file=sys.stderr)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


if workflow.is_main_process:
    DIRECTORY_LOCK = hold_working_directory()
    for line in recover_results("results", {**RUNS, **CALIBRATIONS}):
        print(line, file=sys.stderr)
