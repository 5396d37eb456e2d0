"""A worker's memory: its limit, and what a prune job needs at least, estimated from the size
of its files before any is read, so that a job that cannot fit is refused at once with what
it needs rather than stopped by the limit halfway."""

import resource

from workers.errors import UnsafeModelError

# RLIMIT_DATA, not RLIMIT_AS: it counts the private writable memory a process can fill (heap,
# anonymous mmaps, thread stacks) and not address space only reserved (glibc's 64 MiB
# per-thread malloc arenas, PROT_NONE guard regions) or mapped from files (the shared
# libraries), which RLIMIT_AS counts and which grow with the machine's cores, not the job.
MEMORY_LIMIT = resource.RLIMIT_DATA

# A prune job's peak per byte of model: the parsed original (pruned in place), what protobuf
# keeps of each weight it replaced, and one weight's pruned copies (the file is written to disk
# as it is encoded). The leanest path (unstructured, dense, no eval data: bench/prune_scale.py
# --only job, README "Pruning at scale") peaks at 2.94x the 268 MB file with the process's
# imports, about 2.53x per model byte without them; rounded down to 2.5: other settings hold
# more, so a job refused could not have fit.
PRUNE_PEAK_PER_MODEL_BYTE = 2.5
# Eval and train data: the file's bytes, parsed into arrays at least as large.
PEAK_PER_DATA_BYTE = 1.0
# Python, NumPy, onnx and onnxruntime loaded in a worker, before any job.
RUNTIME_BYTES = 150 * 2**20


def memory_limit() -> int | None:
    """This process's memory limit in bytes, None if it has none."""
    soft, _ = resource.getrlimit(MEMORY_LIMIT)
    return None if soft == resource.RLIM_INFINITY else soft


def prune_peak_bytes(model_bytes: int, data_bytes: int) -> int:
    """The least a prune job of these files needs at its peak, whatever its settings (the
    module docstring)."""
    return int(
        RUNTIME_BYTES + PRUNE_PEAK_PER_MODEL_BYTE * model_bytes + PEAK_PER_DATA_BYTE * data_bytes
    )


def require_memory(needed: int) -> None:
    """Refuse the job now when it needs more than this process may hold."""
    limit = memory_limit()
    if limit is None or needed <= limit:
        return
    raise UnsafeModelError(
        f"this job needs at least {needed / 2**30:.2f} GiB (about {PRUNE_PEAK_PER_MODEL_BYTE:g}x "
        f"the model), more than a worker may use: {limit / 2**30:.2f} GiB "
        "(CLIPPRUNE_WORKER_MEMORY_BYTES): raise it, or run fewer CLIPPRUNE_WORKERS (which raises "
        "its default), or send a smaller model"
    )
