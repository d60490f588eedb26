"""The SSH connection pyinfra holds to each host, made fit for many small commands, and for
reaching the host's own ports."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from weakref import WeakSet

from paramiko import ChannelException, SSHException
from pyinfra import logger
from pyinfra.api import State
from pyinfra.api.host import Host
from pyinfra.api.state import BaseStateCallback
from pyinfra.connectors.local import LocalConnector


class NotForwarded(ConnectionError):
    """The host's sshd opened no connection for us: it forwards nothing for this login
    (``AllowTcpForwarding no``, a ``restrict`` key, ``PermitOpen``), or its own connection
    failed (nothing listens there, or sshd cannot reach the address: ``AddressFamily``).
    A ConnectionError, as the refusal of a connection made directly would be."""


def _transport(host: Host):
    """paramiko's transport under pyinfra's SSH connector; None for other connectors."""
    client = getattr(host.connector, "client", None)
    return client.get_transport() if client is not None else None


def without_nagle(host: Host) -> None:
    """Turn Nagle's algorithm off on the host's SSH connection (TCP_NODELAY).

    paramiko, under pyinfra's SSH connector, sets no socket option: each command's small
    writes then wait for the host's delayed ACK, about 40 ms per command whatever the network
    (measured on the local fleet: 20 commands over one connection, 0.99 s; with TCP_NODELAY,
    0.15 s). A host reached otherwise (a proxy command, @local) is left as it is.
    """
    sock = getattr(_transport(host), "sock", None)
    if sock is not None and getattr(sock, "family", None) in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _RefusedChannelsAreAnswers(logging.Filter):
    """paramiko logs every refused channel as an error, and pyinfra's CLI prints other libraries'
    errors: for the channels ``connect_on_host`` opens, a refusal is an answer. (A refusal of
    pyinfra's own channels is raised to pyinfra as before; only paramiko's line goes.)"""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.msg  # paramiko formats its own: no arguments to merge, nothing to raise
        return not (
            isinstance(message, str)
            and "open FAILED" in message
            and message.endswith(("Connect failed", "Administratively prohibited"))
        )


logging.getLogger("paramiko.transport").addFilter(_RefusedChannelsAreAnswers())


def connect_on_host(host: Host) -> Callable | None:
    """A ``socket.create_connection((address, port), timeout)`` that connects from the host
    itself: through the host's SSH connection, where sshd opens the TCP connection on the host
    (a ``direct-tcpip`` channel, as ``ssh -L`` asks), or directly where pyinfra runs on the host
    (@local). None for other connectors. A connection sshd does not open raises NotForwarded;
    a channel that does not open in time, or an SSH connection that is gone, ConnectionError:
    the host script's callers take every OSError for no answer.
    """
    if isinstance(host.connector, LocalConnector):
        return socket.create_connection
    transport = _transport(host)
    if transport is None:
        return None

    def connect(address: tuple[str, int], timeout: float):
        try:
            channel = transport.open_channel(
                "direct-tcpip", dest_addr=address, src_addr=("127.0.0.1", 0), timeout=timeout
            )
        except ChannelException as error:
            raise NotForwarded(
                f"{host.name}'s sshd opened no connection to {address[0]} port {address[1]}: {error.text}"
            ) from None
        except SSHException as error:  # "Timeout opening channel.", "SSH session not active"
            raise ConnectionError(f"{host.name}'s SSH connection opened no channel: {error}") from None
        channel.settimeout(timeout)
        return channel

    return connect


def connection_lost(host: Host) -> bool:
    """Whether the host's SSH connection is gone (the host powered off, rebooted, or its network
    dropped); False for other connectors."""
    transport = _transport(host)
    return transport is not None and not transport.is_active()


class LostConnections(BaseStateCallback):
    """Names each host whose connection is gone when one of its operations fails, with the
    cause and the step: pyinfra's own line says only how many commands ran."""

    def __init__(self) -> None:
        self.lost: dict[str, str] = {}

    def operation_host_error(self, state, host, op_hash, retry_count=0, max_retries=0):
        if host.name not in self.lost and connection_lost(host):
            step = " / ".join(sorted(state.op_meta[op_hash].names))
            self.lost[host.name] = f"connection lost during {step}: the host is down or its network is unreachable"
            logger.error(f"--> {host.name}: {self.lost[host.name]}")


_REPORTING: WeakSet = WeakSet()


def report_lost_connections(state: State) -> LostConnections | None:
    """Add a ``LostConnections`` to a run, once (deploy.py runs once per host)."""
    if state in _REPORTING:
        return None
    _REPORTING.add(state)
    handler = LostConnections()
    state.add_callback_handler(handler)
    return handler
