"""The fan-out's scheduler, on the control node: which host copies which file from which peer.

Every member of a fan-out runs its part (``glmfleet-weights swarm``, files/glmfleet_weights.py)
under the control node, which tells it what to fetch and hears what it holds, one JSON line each
way over the deploy's own SSH connection to that host. The copies themselves go host to host
over SSH with the fleet's transfer key, whose only command gives one model file of the store
(``glmfleet-weights give``).

A host passes on a file while it still receives it: a copy may be taken from a member that is
itself still copying that file, its bytes handed on as they land (a chain, each link of it at
the speed of both hosts' links), and every receiver hashes its whole copy against the manifest
before it holds the file. The seed hands on what the control node pushes as it lands too (what
a hub delivers, once it is whole). Each host reads one copy at a time and has its next one
set up behind it (the control node's round trip, the ssh session, the peer's ``give`` starting
and the hash of the last file all take time its link would otherwise spend idle); a member
gives to one receiver at a time (``assign_one``), so a chain holds from file to file. The rarest
file goes first (counting copies under way), from a member that holds it whole where one is
free. A slow member is kept out of the chains (``slow``). The aim is about
S/B for S bytes on links of bandwidth B, against log2(N) x S/B for whole copies in doubling
rounds; how near it came, measured beside the rounds: benchmarks/RESULTS.md.

A peer whose copy did not match the manifest gives nothing more until it has hashed its files
again; a peer that failed (a cut link) is asked again later, with a growing pause. A member that
waits for files no host holds, while nothing is under way, is stopped with the reason.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gevent import sleep, spawn
from gevent.queue import Queue
from gevent.subprocess import PIPE, Popen
from pyinfra.api.output import echo

from glmfleet import shell
from roles.model_weights.control import push, ssh_argv, ssh_target

# A peer that failed to give a file (its link cut, say) is not asked by that receiver again for
# this long, doubled with each further failure.
FIRST_PAUSE_S = 2.0
LONGEST_PAUSE_S = 60.0
SLOW_SHARE = 0.5
# A receiver's copies: the one it reads and the next, set up meanwhile. A giver's: those two of
# one receiver.
COPIES_IN = 2
COPIES_OUT = 2


@dataclass
class Copy:
    giver: str
    since: float  # when it was asked for, or when the copy before it ended: when it began to be read
    chained: bool  # handed on from a member still receiving the file
    cancelled: bool = False  # the receiver was told to drop it (its giver is slow)


@dataclass
class Member:
    name: str
    address: str  # where the others reach its sshd: "host:port"
    joined: bool = False  # its part runs
    ready: bool = False  # it has the manifest and room: it may receive
    complete: bool = False
    left: bool = False  # its part ended (it may still give: its sshd serves until the key goes)
    failed: str | None = None
    have: set[str] = field(default_factory=set)
    fetching: dict[str, Copy] = field(default_factory=dict)  # file -> its copy, the one read first
    # The files the control node's push has begun here (the seed), and when: rsync may begin the
    # next before this host has hashed the last.
    arriving: dict[str, float] = field(default_factory=dict)
    rate: float = 0.0  # the fastest of its copies so far, bytes/s (0: none yet)
    giving: int = 0
    distrusted: bool = False  # gave a file that did not match: gives nothing until rechecked
    pauses: dict[str, tuple[float, float]] = field(default_factory=dict)  # giver -> (until, last pause)


class Swarm:
    """One fan-out's state. ``send(name, message)`` hands a message to a member's part; the
    caller feeds back what each part says (``event``) and when it ends (``ended``), and calls
    ``tick`` now and then so that paused peers are asked again."""

    def __init__(
        self,
        addresses: dict[str, str],
        complete: set[str],
        seed: str | None,
        manifest: dict | None,
        send: Callable[[str, dict], None],
        leave_when_complete: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.members = {name: Member(name, address) for name, address in addresses.items()}
        self.seed = seed
        self.send = send
        # A pyinfra pool smaller than the fleet runs some parts only once others have ended:
        # then a complete member leaves at once rather than wait for those.
        self.leave_when_complete = leave_when_complete
        self.clock = clock
        self.origin_running = seed is not None
        # Who the manifest came from: None for the control node's own (given here), sent to
        # every member; the seed that learnt it from the hub needs it from no one.
        self.manifest_from: str | None = None
        self.origin_error: str | None = None
        self.use(manifest)  # and ``measurable``: smaller copies do not tell a member's speed
        self.copies = 0  # files copied between hosts (for the summary)
        self.rejected = 0
        for name in complete:
            self.members[name].complete = True

    # -- what the parts say ---------------------------------------------------------------------

    def event(self, name: str, event: dict) -> list[str]:
        """Take one message from a member's part; returns lines worth showing the person deploying."""
        member, kind, said = self.members[name], event["event"], []
        if kind == "hello":
            member.joined = True
            if event["complete"]:
                member.complete = member.ready = True
                member.have = set(event["verified"])
                self.learn(event["manifest"], name)
            elif self.manifest and name != self.manifest_from:
                self.send(name, {"do": "manifest", "manifest": self.manifest})
        elif kind == "ready":
            member.ready = True
            member.have |= set(event["verified"])
            if name == self.seed:
                self.learn(event["manifest"], name)
        elif kind == "arriving":
            member.arriving[event["path"]] = self.clock()
        elif kind == "verified":
            path = event["path"]
            member.have.add(path)
            if path in member.arriving:
                since = member.arriving.pop(path)
                self.measure(member, self.manifest["files"][path]["size"], self.clock() - since, False)
            elif path in member.fetching:
                copy = member.fetching[path]
                # The part times its reading of the copy; without that, from when it could begin.
                took = event.get("took") or self.clock() - copy.since
                giver = self.members[copy.giver]
                upstream_bound = copy.chained and (path not in giver.have or self.slow(giver))
                received = event.get("received")
                brought = self.manifest["files"][path]["size"] if received is None else received
                self.measure(member, brought, took, upstream_bound)
                giver = self.end_copy(member, path)
                member.pauses.pop(giver.name, None)
                self.copies += 1
        elif kind == "failed" and event["path"] in member.fetching:
            cancelled = member.fetching[event["path"]].cancelled
            giver = self.end_copy(member, event["path"])
            if event["bad"]:
                self.rejected += 1
                said.append(
                    f"{event['path']} from {giver.name} did not match the manifest: {giver.name} hashes its copy again"
                )
                giver.distrusted = True
                if giver.joined and not giver.left:
                    self.send(giver.name, {"do": "recheck"})
            elif cancelled:
                said.append(f"{event['path']}: {giver.name} receives it slowly; the copy goes on from another peer")
            else:
                said.append(f"copying {event['path']} from {giver.name} failed ({event['why']}): asking another peer")
                _until, last = member.pauses.get(giver.name, (0.0, FIRST_PAUSE_S / 2))
                pause = min(last * 2, LONGEST_PAUSE_S)
                member.pauses[giver.name] = (self.clock() + pause, pause)
        elif kind == "rechecked":
            member.have -= set(event["lost"])
            member.distrusted = False
            if event["lost"]:
                member.complete = False
                said.append(f"{name} removed {len(event['lost'])} file(s) that did not match; it fetches them again")
        elif kind == "origin":
            self.origin_running = False
            member.arriving.clear()
            self.origin_error = event["error"]
        elif kind == "complete":
            member.complete = True
            member.have = set(self.manifest["files"]) if self.manifest else member.have
        self.tick()
        return said

    def ended(self, name: str, ok: bool, why: str | None = None) -> None:
        member = self.members[name]
        member.left, member.joined = True, True
        if not ok:
            member.failed = why or "its part failed"
            for path in list(member.fetching):
                self.end_copy(member, path)
            if name == self.seed and self.origin_running:
                self.origin_running = False
                self.origin_error = f"the seed {name} failed"
        self.tick()

    # -- decisions ----------------------------------------------------------------------------

    def tick(self) -> None:
        """Give every idle receiver its next copy; let parts leave or stop them when the fan-out
        is over for them."""
        slow = {m.name: self.slow(m) for m in self.members.values()}  # once a pass: each sorts all speeds
        self.reroute(slow)
        self.assign(slow)
        running = [m for m in self.members.values() if m.joined and not m.left]
        if all(m.joined for m in self.members.values()) and all(m.complete or m.left for m in self.members.values()):
            for member in running:
                self.leave(member)
        elif self.leave_when_complete:
            for member in running:
                if member.complete:
                    self.leave(member)
        if not self.under_way():
            for member in running:
                missing = sorted(set(self.manifest["files"]) - member.have) if self.manifest else []
                if member.ready and missing and not member.fetching and not self.paused(member):
                    why = f"no host holds a verified copy of {len(missing)} file(s) ({', '.join(missing[:3])})"
                    self.send(
                        member.name,
                        {"do": "stop", "why": why + (f": {self.origin_error}" if self.origin_error else "")},
                    )
                    member.left, member.failed = True, why

    def assign(self, slow: dict[str, bool]) -> None:
        if self.manifest is None:
            return
        files = sorted(self.manifest["files"])
        # The seed takes nothing from peers while the origin delivers to it: both would write one file.
        receivers = [
            m
            for m in self.members.values()
            if m.ready
            and not m.complete
            and not m.left
            and len(m.fetching) < self.copies_in(m, slow)
            and not (m.name == self.seed and self.origin_running)
        ]
        # The soonest free first: a file new on the seed goes down a chain in the order its
        # members will be free to read it, so that none waits on a member still reading another.
        speed = self.typical_rate()
        random.shuffle(receivers)
        receivers.sort(key=lambda m: self.free_at(m, speed))
        gives_to = {name: [] for name in self.members}
        for member in self.members.values():
            for copy in member.fetching.values():
                gives_to[copy.giver].append(member.name)
        for receiver in receivers:
            while len(receiver.fetching) < self.copies_in(receiver, slow) and self.assign_one(
                receiver, files, slow, gives_to
            ):
                pass

    @staticmethod
    def copies_in(member: Member, slow: dict[str, bool]) -> int:
        """A slow member has no copy set up behind the one it reads: it would hold a giver's
        second place through its long copies."""
        return 1 if slow[member.name] else COPIES_IN

    def assign_one(self, receiver: Member, files: list[str], slow: dict[str, bool], gives_to: dict) -> bool:
        """The receiver's next copy: the rarest file it lacks, from a member free to give it:
        one giving nothing, or giving to this receiver alone, which reads one copy at a time (two
        read at once from one member would halve both). Down a chain, each member so has its
        next file set up behind the one it reads, from the member it reads that one from. A slow
        receiver has no copy set up from a member (it would hold the member's upload for two of
        its long copies, ``copies_in``), and leaves most of its giver's link free: another
        receiver may share it."""
        now, best = self.clock(), None
        for path in files:
            if path in receiver.have or path in receiver.fetching:
                continue
            givers = [
                giver
                for giver in self.members.values()
                if giver is not receiver
                and (path in giver.have or (self.receives(giver, path) and not slow[giver.name]))
                # While the origin delivers, the seed's upload is what every new file waits on.
                and not (giver.name == self.seed and self.origin_running and slow[receiver.name])
                and not giver.distrusted
                and (
                    not giver.giving
                    or (
                        giver.giving < COPIES_OUT
                        and (
                            gives_to[giver.name] == [receiver.name] or all(slow[name] for name in gives_to[giver.name])
                        )
                    )
                )
                and receiver.pauses.get(giver.name, (0.0, 0.0))[0] <= now
            ]
            # A fast member takes from a slow one only what no other can give it, and only for
            # the copy it reads next: one set up behind another may yet find a faster giver.
            preferred = [g for g in givers if not slow[g.name] or slow[receiver.name]]
            if not preferred and receiver.fetching:
                continue
            givers = preferred or givers
            # A member giving nothing before one that gives already: both would share its link.
            idle = [g for g in givers if not g.giving]
            givers = idle or givers
            if givers:
                key = (not preferred, not idle, self.holders(path), random.random())
                if best is None or key < best[0]:
                    # A whole copy before one still arriving: that one gives no faster than it gets.
                    holding = [giver for giver in givers if path in giver.have]
                    best = (key, path, random.choice(holding or givers))
        if best is None:
            return False
        _key, path, giver = best
        # A copy behind another begins to be read when that one ends (``end_copy``).
        receiver.fetching[path] = Copy(giver.name, now, chained=path not in giver.have)
        giver.giving += 1
        gives_to[giver.name].append(receiver.name)
        self.send(receiver.name, {"do": "fetch", "path": path, "peer": giver.address})
        return True

    def typical_rate(self) -> float:
        """The members' median speed, bytes/s (0: none measured yet)."""
        known = sorted(m.rate for m in self.members.values() if m.rate)
        return known[len(known) // 2] if known else 0.0

    def read_s(self, member: Member, path: str, typical: float) -> float:
        """How long the member takes to read a copy of the file, at its speed (else the typical one)."""
        rate = member.rate or typical
        return self.manifest["files"][path]["size"] / rate if rate else 0.0

    def free_at(self, member: Member, typical: float) -> float:
        """When the member will have read the copy it reads now (reading nothing: now)."""
        path, copy = self.read_now(member)
        return max(self.clock(), copy.since + self.read_s(member, path, typical)) if copy else self.clock()

    def reroute(self, slow: dict[str, bool]) -> None:
        """A copy handed on from a member that turned out slow waits on that member's link, and
        one handed on from a member whose own copy of the file ended without it waits for bytes
        that do not come: either is dropped (what arrived stays staged) and taken up again from
        another giver. Down a chain, each link follows at the next tick. A slow member's copy set
        up behind the one it reads is dropped too: it holds a giver's second place for long."""
        for member in self.members.values():
            for n, (path, copy) in enumerate(member.fetching.items()):
                if copy.cancelled:
                    continue
                giver = self.members[copy.giver]
                orphaned = copy.chained and not (path in giver.have or self.receives(giver, path))
                if (copy.chained and slow[copy.giver]) or orphaned or (n and slow[member.name]):
                    copy.cancelled = True
                    self.send(member.name, {"do": "cancel", "path": path})

    def holders(self, path: str) -> int:
        """How many hold the file or are getting it: the fewer, the sooner it is copied."""
        return sum(path in m.have or self.receives(m, path) for m in self.members.values())

    def measure(self, member: Member, brought: int, took: float, upstream_bound: bool) -> None:
        """A copy's speed, bytes/s, from the bytes it brought (a resumed copy brings the rest
        only; the origin's, the whole file) over the time it was read. A chained copy runs no
        faster than its giver's own: it says how slow the member is only where the giver held
        the file whole by the end, and was not slow itself."""
        if took <= 0 or brought < self.measurable:
            return
        rate = brought / took
        if not upstream_bound or not self.slow(member, rate):
            member.rate = max(member.rate, rate)

    def slow(self, member: Member, rate: float | None = None) -> bool:
        """Its best copy ran at less than SLOW_SHARE of the members' median speed, or its first
        copy is already late for that speed. A slow member gives only what it holds whole, to a
        fast one only what no other can give; while the origin delivers it takes nothing from the
        seed, whose one upload every new file waits on; copies handed on from it are dropped and
        go on from another giver (``reroute``)."""
        typical = self.typical_rate()
        if not typical or (member.name == self.seed and self.origin_running):
            return False  # the seed receives at the origin's speed, and new files come only from it
        rate = member.rate if rate is None else rate
        if rate:
            return rate < SLOW_SHARE * typical
        path, copy = self.read_now(member)
        size = self.manifest["files"][path]["size"] if copy else 0
        return size >= self.measurable and self.clock() - copy.since > size / (SLOW_SHARE * typical)

    @staticmethod
    def read_now(member: Member) -> tuple[str, Copy | None]:
        """The copy the member reads now: the first of its copies (the next one waits behind it)."""
        return next(iter(member.fetching.items()), ("", None))

    @staticmethod
    def receives(member: Member, path: str) -> bool:
        """The file lands on the member now or will once the copy before it ends: it can be
        handed on as it does (the give waits for the copy to begin)."""
        copy = member.fetching.get(path)
        return (copy is not None and not copy.cancelled) or path in member.arriving

    def learn(self, manifest: dict | None, source: str) -> None:
        """The revision's manifest, from the seed or a complete member: to every member waiting for one."""
        if manifest is None or self.manifest is not None:
            return
        self.use(manifest)
        self.manifest_from = source
        for member in self.members.values():
            if member.joined and not member.left and not member.ready and member.name != self.seed:
                self.send(member.name, {"do": "manifest", "manifest": manifest})

    def use(self, manifest: dict | None) -> None:
        self.manifest = manifest
        sizes = sorted(entry["size"] for entry in (manifest or {"files": {}})["files"].values())
        # A copy of a config file is all set-up time: only copies of a quarter of a typical file
        # or more tell a member's speed.
        self.measurable = sizes[len(sizes) // 2] / 4 if sizes else 0.0

    def leave(self, member: Member) -> None:
        member.left = True
        self.send(member.name, {"do": "leave"})

    # -- what it knows --------------------------------------------------------------------------

    def under_way(self) -> bool:
        """Something that may yet give a member a file it lacks: the origin, a copy, a recheck,
        a member that has not joined or not got its manifest."""
        return (
            self.origin_running
            or any(m.fetching for m in self.members.values())
            or any(m.distrusted and m.joined and not m.left for m in self.members.values())
            or any(not m.joined or (not m.ready and not m.left) for m in self.members.values())
        )

    def paused(self, member: Member) -> bool:
        return any(until > self.clock() for until, _pause in member.pauses.values())

    def end_copy(self, receiver: Member, path: str) -> Member:
        was_read = self.read_now(receiver)[0] == path
        giver = self.members[receiver.fetching.pop(path).giver]
        giver.giving -= 1
        if was_read and receiver.fetching:  # the next copy is read from now on
            following = self.read_now(receiver)[1]
            following.since = max(following.since, self.clock())
        return giver

    def summary(self) -> str:
        members = self.members.values()
        return (
            f"{sum(m.complete for m in members)} of {len(self.members)} hosts complete, "
            f"{self.copies} file copies between hosts" + (f", {self.rejected} rejected" if self.rejected else "")
        )


# --- running it: each member's part over SSH, in the member's own greenlet ----------------------

# The control node's session with a member's part: a host silent this long (a link cut for good)
# fails; shorter cuts are ridden out, as its copies are.
PART_ALIVE_INTERVAL_S = 15
PART_ALIVE_COUNT = 8
TICK_S = 1.0


class Fanout:
    """One fan-out on the control node: the scheduler and every member's part (an ssh process).
    Messages to a part go through a queue that one greenlet per part writes out, so the
    scheduler never yields to another greenlet half way through a decision."""

    def __init__(self, swarm_arguments: dict):
        self.swarm = Swarm(**swarm_arguments, send=self.send)
        self.queues: dict[str, Queue] = {}
        self.ticker = None

    def send(self, name: str, message: dict) -> None:
        if name in self.queues:
            self.queues[name].put((json.dumps(message) + "\n").encode())

    def take_part(self, state, host, argv: list[str], push: list[str] | None, interval: int) -> bool:
        """A pyinfra step (``live_steps``): run this member's part until the fan-out is over for
        it; with ``push`` (the seed, from a control directory) push the files once it is ready."""
        prefix = host.print_prefix
        process = Popen(
            [
                *ssh_argv(host.data),
                "-o",
                f"ServerAliveInterval={PART_ALIVE_INTERVAL_S}",
                "-o",
                f"ServerAliveCountMax={PART_ALIVE_COUNT}",
                ssh_target(host.data, host.name),
                shell.join(argv),
            ],
            stdin=PIPE,
            stdout=PIPE,
            stderr=PIPE,
        )
        self.queues[host.name] = Queue()
        writer = spawn(self.write, host.name, process)
        reader = spawn(self.show, prefix, process.stderr)
        if self.ticker is None:
            self.ticker = spawn(self.tick, state)
        pusher = None
        for line in process.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                echo(f"{prefix}fan-out: not a message: {line[:200]!r}", err=True)
                continue
            for said in self.swarm.event(host.name, event):
                echo(f"{prefix}fan-out: {said}", err=True)
            if push and event["event"] == "ready" and pusher is None:
                pusher = spawn(self.push, state, host, push, interval)
        process.wait()
        reader.join()
        writer.kill()
        if pusher:
            pusher.kill()
        ok = process.returncode == 0
        self.swarm.ended(host.name, ok, None if ok else f"its part ended with status {process.returncode}")
        echo(f"{prefix}fan-out: {self.swarm.summary()}", err=True)
        return ok

    def write(self, name: str, process) -> None:
        for data in self.queues[name]:
            try:
                process.stdin.write(data)
                process.stdin.flush()
            except OSError:  # the part has ended
                return

    @staticmethod
    def show(prefix: str, stream) -> None:
        """The part's words for people: progress, files that did not match, failures."""
        for line in stream:
            echo(f"{prefix}{line.decode(errors='replace').rstrip()}", err=True)

    def push(self, state, host, argv: list[str], interval: int) -> None:
        """The seed's copy from the control node: the files it does not hold yet."""
        seed = self.swarm.members[host.name]
        ok = push(state, host, argv, interval, sorted(set(self.swarm.manifest["files"]) - seed.have))
        self.send(host.name, {"do": "origin_done", "ok": ok})

    def tick(self, state) -> None:
        """Paused peers are asked again once their pause is over; a member that pyinfra failed
        before its part began (its hub CLI did not install, say) will not join."""
        while not all(m.left for m in self.swarm.members.values()):
            sleep(TICK_S)
            failed = {failed_host.name for failed_host in state.failed_hosts}
            for member in self.swarm.members.values():
                if not member.joined and member.name in failed:
                    self.swarm.ended(member.name, False, "it failed before the fan-out")
            self.swarm.tick()
