"""The TEST DOUBLE's imitation of vLLM's multi-node runtime, as far as a deployer sees it.

vLLM's ranks meet on the head: with ``--nnodes`` (tensor/pipeline parallel over hosts) every
rank joins the head's torch.distributed store on ``--master-addr:--master-port``; with data
parallel over hosts (``--data-parallel-start-rank``) the engines say hello on the head's
``--data-parallel-address:--data-parallel-rpc-port``. The head serves nothing until every rank
has joined, within ``--distributed-timeout-seconds``. Here a rank joins by a TCP connection that
stays open and says its rank; the head answers ``go`` once all are there. What the deploy sees:

- the head's API answers only once every rank has joined; a rank that never comes makes the
  head exit non-zero after the timeout;
- a ``--headless`` rank opens no HTTP port;
- a rank that goes away makes the head exit non-zero (vLLM's engine dies on its next RPC), and a
  head that goes away makes every rank exit non-zero, so systemd's Restart= brings both back.
  (Real vLLM 0.22 and 0.33 ranks keep waiting on a head that is gone, vllm#32136: glmfleet
  restarts the ranks of a group together and restarts a rank that started before its head.)
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass

log = logging.getLogger("vllm_test_double")


@dataclass(frozen=True)
class Membership:
    """Where this process meets its group, and as which rank; ``size`` ranks in all."""

    rank: int
    size: int
    address: str
    port: int
    timeout_s: float

    @property
    def is_head(self) -> bool:
        return self.rank == 0


def membership(args) -> Membership | None:
    """The group this command line makes this process a rank of; None when it runs alone."""
    timeout = args.distributed_timeout_seconds or 600.0
    if args.nnodes > 1:
        return Membership(args.node_rank, args.nnodes, args.master_addr, args.master_port, timeout)
    local = args.data_parallel_size_local or args.data_parallel_size
    if args.data_parallel_size > local:
        return Membership(
            (args.data_parallel_start_rank or 0) // local,
            args.data_parallel_size // local,
            args.data_parallel_address or args.master_addr,
            args.data_parallel_rpc_port,
            timeout,
        )
    return None


class Group:
    """This process's side of the meeting: join (or gather) once, then watch the others."""

    def __init__(self, member: Membership):
        self.member = member
        self.peers: list[socket.socket] = []
        self.lost = threading.Event()  # a rank (for the head) or the head (for a rank) went away
        self.why = ""

    def join(self) -> bool:
        """Block until the group is complete; False (logged) when the timeout passed first."""
        return self._gather() if self.member.is_head else self._join_head()

    def _gather(self) -> bool:
        m = self.member
        listener = socket.create_server((m.address, m.port), reuse_port=False)
        listener.settimeout(1.0)
        log.info("Rank 0: waiting for %d more rank(s) on %s:%d", m.size - 1, m.address, m.port)
        deadline = time.monotonic() + m.timeout_s
        joined: dict[int, socket.socket] = {}
        try:
            while len(joined) < m.size - 1:
                if time.monotonic() > deadline:
                    log.error("Timed out after %gs: ranks %s never joined", m.timeout_s, missing(joined, m.size))
                    return False
                try:
                    conn, peer = listener.accept()
                except TimeoutError:
                    continue
                conn.settimeout(10)
                try:
                    rank = int(conn.recv(64).decode().split()[1])
                except (OSError, ValueError, IndexError):
                    conn.close()
                    continue
                conn.settimeout(None)
                if rank in joined or not 0 < rank < m.size:
                    log.warning("Rank %d from %s joined twice or is out of range: refused", rank, peer)
                    conn.close()
                    continue
                joined[rank] = conn
                log.info("Rank %d joined from %s:%d", rank, *peer[:2])
        finally:
            listener.close()
        for rank, conn in sorted(joined.items()):
            conn.sendall(b"go\n")
            self._watch(conn, f"rank {rank} left the group")
        log.info("All %d ranks joined", m.size)
        return True

    def _join_head(self) -> bool:
        m = self.member
        deadline = time.monotonic() + m.timeout_s
        while True:
            try:
                conn = socket.create_connection((m.address, m.port), timeout=5)
                conn.sendall(f"rank {m.rank}\n".encode())
                conn.settimeout(max(1.0, deadline - time.monotonic()))
                if conn.recv(16).startswith(b"go"):
                    conn.settimeout(None)
                    break
                conn.close()
            except OSError:
                pass
            if time.monotonic() > deadline:
                log.error(
                    "Timed out after %gs: the head at %s:%d never took rank %d", m.timeout_s, m.address, m.port, m.rank
                )
                return False
            time.sleep(0.5)
        log.info("Rank %d joined the head at %s:%d", m.rank, m.address, m.port)
        self._watch(conn, "the head left the group")
        return True

    def _watch(self, conn: socket.socket, why: str) -> None:
        self.peers.append(conn)

        def wait_for_eof():
            try:
                while conn.recv(64):
                    pass
            except OSError:
                pass
            if not self.lost.is_set():
                self.why = why
                self.lost.set()

        threading.Thread(target=wait_for_eof, name="group-watch", daemon=True).start()

    def close(self) -> None:
        self.lost.set()
        for conn in self.peers:
            conn.close()


def missing(joined: dict[int, socket.socket], size: int) -> list[int]:
    return [rank for rank in range(1, size) if rank not in joined]
