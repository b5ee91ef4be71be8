"""Node-local shared-memory arena: zero-copy tensor hand-off from CPU workers to the daemon.

Layout of the arena file (``<shm_dir>/clipline-<deployment>.arena``, mode 0600)::

    [ header page: header, one state byte per slot | slot table (n_slots x 256 B) | pad
      to page | slot 0 | slot 1 | ... ]

Each data slot is a page-aligned, fixed-size region. The slot table holds, per slot, the
descriptor of what it carries (shape, dtype, job id, generation, chunk, priority class,
request arrival time, publish time); the states sit together in the header page so a
scan of every slot is one ``bytes.find``. A slot moves through::

    FREE --reserve--> WRITING --publish--> READY --take--> CONSUMING --release--> FREE
                         |  abort / producer died            |  requeue / daemon died
                         +--------------> FREE      READY <---+

A producer (a worker process) reserves a slot, writes its preprocessing output straight
into a numpy view over the slot, and publishes: only the descriptor changes hands, and a
one-byte datagram on a unix socket wakes the daemon. The consumer (the daemon) maps the
slot zero-copy (:meth:`Consumer.array`, :meth:`Consumer.tensor`: ``torch.from_numpy``
over the same pages) and releases it once the data is on the device: on CUDA only after
the copy stream's event has completed, because until then the DMA engine is still
reading the slot. The daemon page-locks the whole data region once
at start (``cudaHostRegister(*arena.base_address())``), never per request, so those
copies are asynchronous DMA straight from the slots; it unregisters before closing.

Leases. Every slot has a lease: an exclusive open-file-description lock
(``F_OFD_SETLK``) on one byte of the arena file, far past its end, held while the slot
is WRITING (by the producer) or CONSUMING (by the daemon). The kernel drops a lock when
the last reference to its open file description goes away, so when a process dies
(SIGKILL included) its leases die with it, and "state says owned, but the lock can be
taken" means "the owner is dead": WRITING slots are reclaimed as FREE
(``clipline_shm_slots_reclaimed_total``) by the daemon's periodic :meth:`reclaim_dead`
and by a producer that finds no free slot; CONSUMING slots (a daemon died mid-batch) go
back to READY when the next daemon starts, so the data is processed instead of dropped
(``Descriptor.recoveries`` counts how often, so a poison chunk can be failed instead of
crashing daemons forever). Liveness never relies on pids: the ``owner`` pid in a record
is for diagnostics only (pid namespaces differ between pods). OFD locks, not classic
``lockf`` locks, because classic locks belong to the *process*: a process never
conflicts with itself (a producer and a consumer in one process would see each other's
slots as free) and closing *any* descriptor of the file drops *all* of the process's
locks on it. With OFD locks each :class:`Arena` object is its own lock owner, which makes
threads, several producers per process and in-process tests behave like separate
processes. Linux only (3.15+); elsewhere classic locks are used with those caveats.

The daemon holds an exclusive lock on byte 0 for its lifetime: a second daemon for the
same deployment refuses to start, and an arena left by a crashed daemon is detected
(lock free) and reused when its layout matches (in-flight slots recovered as above) or
replaced when it does not. A replacement is a new file renamed over the old name, never
the old file truncated, so a producer still mapping the old file cannot fault; producers
notice the new inode at their next ``reserve`` and reattach, and a ``publish`` into a
replaced or removed arena raises ``gpu_unavailable`` so the job is retried at once.

Memory ordering. The descriptor and the data must be visible to the consumer before it
acts on a READY state. The protocol does not rely on x86's total store order: the
producer writes data, descriptor and state and *then* drops its lease (an ``fcntl``
call); the consumer reads the state table only as a hint, takes the slot's lease (an
``fcntl`` call) and *then* re-reads the descriptor, and uses that copy. Lock and unlock
serialise on the inode's lock-list spinlock in the kernel, which has release/acquire
semantics on every architecture, so everything the producer wrote before unlocking
happens-before everything the consumer reads after locking (the same argument covers
release -> reserve for the slot's reuse, and the datagram wake-up adds a second such
edge). On x86 the plain stores would already be ordered; on aarch64 this lock edge is
what makes the hand-off correct. A take that races a publish simply fails to lock and
is retried on the wake-up that follows every publish.

Wake-up. The datagram socket was measured against the alternatives (two processes,
one-way, this project's 2-core VM under load): datagram + poll 18-25 us, a pipe (a FIFO
would behave the same) 16 us, eventfd 10-12 us, spinning on the state byte 8 us at the
median but 11 ms at p99 once the cores are shared. Under CPU contention the pipe and the
socket are equal; eventfd cannot be shared between pods without passing descriptors;
spinning burns a core the workers need. So: a datagram socket, which is connectionless
(a restarted daemon just binds a new one; producers reconnect on error), and nothing is
done on the hot path that can wait: metrics are recorded after the wake-up (producer)
or at ``release``/``wait`` (consumer), descriptors are decoded once per publish, views
are reused per slot.

Processes and threads. :class:`Producer` is thread-safe (one lock around its slot
bookkeeping; a lease is used by one thread at a time). :class:`Consumer` belongs to one
thread; its read-only queries (``arena.states()``, ``ready_count``) are safe anywhere.
Fork safety: a forked child never uses its parent's mapping or leases; an at-fork hook
closes every inherited arena in the child (so the child does not keep the parent's
locks alive once the parent dies) and resets every producer, which reattaches lazily on
first use. Celery prefork children therefore each attach their own arena even
if the parent had one. A child that still holds numpy views of an inherited mapping keeps
that mapping (and with it the parent's open file description) until it drops them.

Why not ``multiprocessing.shared_memory``: on Python < 3.13 every process that attaches
a ``SharedMemory`` registers it with its resource tracker, which unlinks the segment when
that process exits (``track=False`` only exists from 3.13), so an exiting worker would
delete the daemon's arena. The arena is therefore a plain file in a tmpfs directory,
opened with ``os.open`` and mapped with ``mmap``; nobody but the daemon ever unlinks it.
Its pages are allocated up front (``posix_fallocate``), so a too-small tmpfs fails the
daemon's start with a clear error instead of a worker's SIGBUS later.

Sharing across processes and containers. Any directory on a memory-backed filesystem
works; everyone who maps the same file shares the same pages, and ``fcntl`` locks and
unix sockets work across mount and pid namespaces of one kernel.

* Containers of one pod: mount an ``emptyDir: {medium: Memory, sizeLimit: ...}`` volume
  at the same path (e.g. ``/dev/shm``, whose container default is only 64 MiB) in the
  daemon and worker containers and set ``CLIPLINE_SHM_DIR`` to it. The memory counts
  against the pod's limit.
* Pods on one node (a GPU daemon's pod and its workers' pods): mount the same
  ``hostPath`` directory, which must be on a tmpfs of the node (e.g.
  ``/dev/shm/clipline-<name>-gpu<i>``, one per GPU daemon, ``type: DirectoryOrCreate``),
  in both and run both with the same uid (``runAsUser``), since the files are owner-only.

Security. The deployment name is part of every file name, so two deployments on one node
never collide. The arena and the socket are created 0600 regardless of the umask; the
daemon opens the arena with ``O_NOFOLLOW`` and refuses a file owned by another user, so
a file planted in a shared ``/dev/shm`` cannot be used against it.
"""

from gpu_service.shm.arena import Arena, attached
from gpu_service.shm.consumer import Consumer
from gpu_service.shm.layout import (
    HEADER_DTYPE,
    ArenaLayout,
    ChunkKind,
    Descriptor,
    SlotState,
)
from gpu_service.shm.producer import Producer, SlotLease

__all__ = [
    "HEADER_DTYPE",
    "Arena",
    "ArenaLayout",
    "ChunkKind",
    "Consumer",
    "Descriptor",
    "Producer",
    "SlotLease",
    "SlotState",
    "attached",
]
