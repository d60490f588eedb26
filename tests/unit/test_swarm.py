"""The fan-out's scheduler (roles/model_weights/swarm.py) against simulated hosts.

Each simulated host answers the scheduler as the host script's part does (files/glmfleet_weights.py,
``Agent``): it reads one copy at a time, a copy takes size / bandwidth of simulated time once read
(a giver read by another host already gives this one what that one leaves of its link, half
at least, for the whole copy: a rough share, and ``shared`` counts them), one asked for while another is read
is set up meanwhile (``setup``: the time from the scheduler's word to the first byte), a seed
receives the origin's files one after another; a host may give bad bytes, lose its link or never
join. The fleet tests drive the real parts on real hosts (tests/fleet/test_fanout_links_fleet.py).
"""

from __future__ import annotations

import heapq
import itertools
import random

import pytest

from roles.model_weights.swarm import COPIES_IN, COPIES_OUT, Swarm

FILES = {f"model-{n:05d}.safetensors": 10 for n in range(1, 13)}
MANIFEST = {"revision": "r" * 40, "files": {path: {"size": size} for path, size in FILES.items()}}


class Fleet:
    """Simulated members; ``run`` plays the fan-out to its end and returns the simulated time."""

    def __init__(self, names, complete=(), seed=None, manifest_from_control=False, bandwidth=None, bad=(), setup=0.0):
        self.now, self.setup = 0.0, setup
        self.queue, self.order = [], itertools.count()
        self.names = list(names)
        self.bandwidth = bandwidth or {}
        self.bad = set(bad)  # hosts whose stored bytes are wrong (a disk gone bad) until rechecked
        self.have = {name: set(FILES) if name in complete else set() for name in names}
        self.ended, self.sent, self.giving = {}, [], {name: 0 for name in names}
        self.most_given = dict(self.giving)  # the most copies each host gave at once
        self.read_from = {name: [] for name in names}  # the rates of the copies read from each host now
        self.shared = 0  # copies read from a host that another host read at the same time
        self.rate_of = {}  # the rate of the copy each host reads
        self.from_origin, self.copies, self.streamed = [], [], []
        self.arriving = {}  # name -> (path, when its copy ends)
        self.waiting = {name: [] for name in names}  # copies asked for: (number, path, giver, when)
        self.reading = {name: None for name in names}  # the copy a host reads, or sets up to read
        self.done_at = {}  # name -> when it held every file
        self.copy_number, self.cancelled = {}, []
        self.down: set[str] = set()
        self.swarm = Swarm(
            addresses={name: f"{name}:22" for name in names},
            complete=set(complete),
            seed=seed,
            manifest=MANIFEST if manifest_from_control else None,
            send=self.receive,
            clock=lambda: self.now,
        )

    def at(self, delay, action, *args, **kwargs):
        heapq.heappush(self.queue, (self.now + delay, next(self.order), action, args, kwargs))

    def say(self, name, event, **fields):
        if name not in self.ended:
            self.swarm.event(name, {"event": event, **fields})

    # -- what a part does with what the scheduler sends --------------------------------------

    def receive(self, name, message):
        self.sent.append((name, message))
        what = message["do"]
        if what == "manifest":
            self.at(0, self.say, name, "ready", manifest=message["manifest"], verified=sorted(self.have[name]))
        elif what == "fetch":
            self.at(0, self.fetch, name, message["path"], message["peer"].split(":")[0])
        elif what == "cancel":
            self.at(0, self.cancel, name, message["path"])
        elif what == "recheck":
            self.bad.discard(name)
            lost = sorted(self.have[name])
            self.have[name] = set()
            self.at(1, self.say, name, "rechecked", lost=lost)
        elif what in ("leave", "stop"):
            self.ended[name] = what if what == "leave" and self.have[name] == set(FILES) else message.get("why", what)

    def fetch(self, name, path, giver):
        assert len(self.swarm.members[name].fetching) <= COPIES_IN
        if name in self.down or giver in self.down:
            self.at(20, self.say, name, "failed", path=path, peer=f"{giver}:22", bad=False, why="timeout")
            return
        self.giving[giver] += 1
        self.most_given[giver] = max(self.most_given[giver], self.giving[giver])
        assert self.giving[giver] <= COPIES_OUT, f"{giver} gives more than {COPIES_OUT} copies at once"
        self.copy_number[(name, path)] = number = next(self.order)
        self.waiting[name].append((number, path, giver, self.now))
        self.next_copy(name)

    def next_copy(self, name):
        """The next copy is read once the one before it ends, and no sooner than its set-up allows."""
        while self.reading[name] is None and self.waiting[name]:
            number, path, giver, asked = self.waiting[name].pop(0)
            if self.copy_number.get((name, path)) == number:  # not cancelled meanwhile
                self.reading[name] = number
                self.at(max(0.0, asked + self.setup - self.now), self.read, name, path, giver, number)

    def done_reading(self, name):
        self.reading[name] = None
        self.next_copy(name)

    def read(self, name, path, giver, number, waited=0.0):
        if self.copy_number.get((name, path)) != number:  # cancelled while it was set up
            self.done_reading(name)
            return
        if path not in self.have[giver] and self.arriving.get(giver, ("",))[0] != path:
            # The giver's own copy has not begun (it waits behind another there): its give waits.
            if waited < 30:
                self.at(0.1, self.read, name, path, giver, number, waited + 0.1)
                return
            self.giving[giver] -= 1
            self.done_reading(name)
            self.say(name, "failed", path=path, peer=f"{giver}:22", bad=False, why="not there")
            return
        self.shared += bool(self.read_from[giver])
        link, others = self.bandwidth.get(giver, 1.0), self.read_from[giver]
        rate = min(self.bandwidth.get(name, 1.0), max(link - sum(others), link / (1 + len(others))))
        others.append(rate)
        self.rate_of[name] = rate
        took = FILES[path] / rate
        if path not in self.have[giver]:  # handed on as it arrives there: ends just after the giver's copy
            took = max(took, self.arriving[giver][1] - self.now + 0.01)
            self.streamed.append((name, path, giver))
        self.arriving[name] = (path, self.now + took)
        self.at(took, self.fetched, name, path, giver, number, took)

    def cancel(self, name, path):
        if path not in self.swarm.members[name].fetching:
            return
        giver = self.swarm.members[name].fetching[path].giver
        self.copy_number[(name, path)] = None  # its reading or end, already scheduled, does not come
        self.giving[giver] -= 1
        if self.arriving.get(name, ("",))[0] == path:
            del self.arriving[name]
            self.read_from[giver].remove(self.rate_of[name])
            self.done_reading(name)
        self.cancelled.append((name, path, giver))
        self.say(name, "failed", path=path, peer=f"{giver}:22", bad=False, why="cancelled")

    def fetched(self, name, path, giver, number, took, stalled=False):
        if self.copy_number.get((name, path)) != number:
            return
        if path not in self.have[giver] and not stalled and self.arriving.get(giver, ("",))[0] != path:
            # The giver's own copy ended without the file: its give waits for bytes (GIVE_STALL_S).
            self.at(30, self.fetched, name, path, giver, number, took + 30, stalled=True)
            return
        self.giving[giver] -= 1
        del self.arriving[name]
        self.read_from[giver].remove(self.rate_of[name])
        self.done_reading(name)
        if path not in self.have[giver]:
            self.say(name, "failed", path=path, peer=f"{giver}:22", bad=False, why="no new bytes for 30 s")
            return
        if giver in self.bad:
            self.say(name, "failed", path=path, peer=f"{giver}:22", bad=True, why="does not match the manifest")
            return
        self.copies.append((name, path, giver))
        self.got(name, path, f"{giver}:22", took)

    def got(self, name, path, peer, took=None):
        self.have[name].add(path)
        self.say(name, "verified", path=path, peer=peer, received=FILES[path] if peer else None, took=took)
        if self.have[name] == set(FILES):
            self.done_at[name] = self.now
            self.say(name, "complete")

    def origin(self, name, paths):
        """The control node's push: each file announced as it begins to land, verified once whole
        (the next one announced first, as the host's part sees rsync begin it before it has
        hashed the last)."""
        if paths:
            self.from_origin.append(paths[0])
            self.say(name, "arriving", path=paths[0])
            self.arriving[name] = (paths[0], self.now + FILES[paths[0]])
            self.at(FILES[paths[0]], self.origin_landed, name, paths)
        else:
            self.say(name, "origin", error=None)

    def origin_landed(self, name, paths):
        del self.arriving[name]
        if paths[1:]:
            self.origin(name, paths[1:])
            self.got(name, paths[0], None)
        else:  # the part says the origin ended once it has hashed the last file
            self.got(name, paths[0], None)
            self.origin(name, [])

    # -- playing it ----------------------------------------------------------------------------

    def join(self, name):
        complete = self.have[name] == set(FILES)
        self.say(name, "hello", complete=complete, manifest=MANIFEST if complete else None, verified=sorted(FILES))
        if name == self.swarm.seed and not self.swarm.manifest:
            self.say(name, "ready", manifest=MANIFEST, verified=[])
            self.at(0, self.origin, name, sorted(FILES))

    def run(self, joining=None, limit=10_000):
        for name in self.names if joining is None else joining:
            self.join(name)
        while self.queue and len(self.ended) < len(self.names):
            self.now, _, action, args, kwargs = heapq.heappop(self.queue)
            assert self.now < limit, "the fan-out did not end"
            action(*args, **kwargs)
            self.swarm.tick()
        return self.now


def test_one_copy_from_the_origin_and_every_host_complete():
    fleet = Fleet([f"h{n}" for n in range(8)], seed="h0")
    fleet.run()
    assert sorted(fleet.from_origin) == sorted(FILES)  # the seed's: each file once
    assert fleet.ended == {name: "leave" for name in fleet.names}
    assert all(fleet.have[name] == set(FILES) for name in fleet.names)
    assert len(fleet.copies) == 7 * len(FILES)  # every other host took each file once


def test_hosts_hand_on_files_while_they_still_receive():
    """The others copy from each other, not only from the seed, and start before the seed has it all."""
    fleet = Fleet([f"h{n}" for n in range(8)], seed="h0")
    fleet.run()
    givers = {giver for _, _, giver in fleet.copies}
    assert len(givers) > 4
    first_copy_done = min(n for n, (_, _, giver) in enumerate(fleet.copies) if giver != "h0")
    assert first_copy_done < len(FILES), "peers began to give only after the seed had every file"


def test_complete_members_give_and_nothing_comes_from_the_origin():
    fleet = Fleet(["a", "b", "c", "d"], complete=["a", "b"])
    fleet.run()
    assert fleet.from_origin == []
    assert fleet.have["c"] == fleet.have["d"] == set(FILES)
    assert fleet.ended == {name: "leave" for name in "abcd"}


def test_the_control_nodes_manifest_goes_to_every_member_the_seed_first():
    fleet = Fleet(["a", "b"], seed="a", manifest_from_control=True)
    for name in "ab":
        fleet.say(name, "hello", complete=False, manifest=None)
    assert [name for name, message in fleet.sent if message["do"] == "manifest"] == ["a", "b"]


def test_a_peer_that_gave_bad_bytes_gives_nothing_more_until_it_has_hashed_its_copy_again():
    fleet = Fleet(["good", "rotten", "c", "d"], complete=["good", "rotten"], bad=["rotten"])
    fleet.run()
    rechecks = [name for name, message in fleet.sent if message["do"] == "recheck"]
    assert rechecks == ["rotten"]
    assert fleet.swarm.rejected >= 1
    assert all(fleet.have[name] == set(FILES) for name in fleet.names)  # rotten fetched its files again
    assert fleet.from_origin == []


def test_a_cut_link_pauses_that_peer_and_the_copy_goes_on_from_another():
    fleet = Fleet(["a", "b", "c", "d"], complete=["a", "b"])
    fleet.down.add("a")
    fleet.at(60, fleet.down.discard, "a")
    fleet.run()
    assert all(fleet.have[name] == set(FILES) for name in fleet.names)
    failures = [m for _, m in fleet.sent if m["do"] == "fetch" and m["peer"] == "a:22"]
    assert failures, "the cut peer was never tried"


@pytest.mark.parametrize("slow", ["h1", "h3", "h5"])
def test_a_slow_host_does_not_hold_the_others_back(slow):
    """Nothing is handed on from the slow host while it receives it, nor taken from it by a fast
    one, and a chain that formed behind it before it was found slow is dropped and goes on from
    another giver: all down a chain would wait on its link (on the fleet, before these rules,
    every host took as long as the slow one). The slow host first in line takes the seed's first
    file: the others lose that file's time, once."""
    random.seed(1)
    fleet = Fleet([f"h{n}" for n in range(6)], seed="h0", bandwidth={slow: 0.2})
    fleet.run()
    assert all(fleet.have[name] == set(FILES) for name in fleet.names)
    limit = sum(FILES.values())
    fast = {name: when for name, when in fleet.done_at.items() if name not in ("h0", slow)}
    assert max(fast.values()) < fleet.done_at[slow]
    assert max(fast.values()) <= 1.5 * limit, fast


def test_a_member_waiting_for_files_no_host_holds_is_stopped_with_the_reason():
    fleet = Fleet(["seed", "b"], seed="seed")
    fleet.join("b")
    fleet.say("seed", "hello", complete=False, manifest=None)
    fleet.say("seed", "ready", manifest=MANIFEST, verified=[])
    fleet.say("seed", "origin", error="the hub answered 404")
    fleet.swarm.ended("seed", False, "its part ended with status 1")
    fleet.run(joining=[])
    assert fleet.ended["b"].startswith("no host holds a verified copy of 12 file(s)")
    assert "the hub answered 404" in fleet.ended["b"]


def test_complete_members_stay_until_every_member_has_joined_and_finished():
    fleet = Fleet(["a", "b", "c"], complete=["a"])
    fleet.join("a")
    assert fleet.ended == {}  # b and c have not joined: a may yet be asked to hash its copy again
    fleet.swarm.ended("c", False, "it failed before the fan-out")
    fleet.run(joining=["b"])
    assert fleet.ended == {"a": "leave", "b": "leave"}


@pytest.mark.parametrize("hosts", [4, 8, 16])
def test_each_host_has_two_copies_at_most_each_way(hosts):
    fleet = Fleet([f"h{n}" for n in range(hosts)], seed="h0")
    fleet.run()  # Fleet.fetch asserts it of each receiver and giver
    assert max(fleet.most_given.values()) == COPIES_OUT
    fetching = [m for _, m in fleet.sent if m["do"] == "fetch"]
    assert len(fetching) == (hosts - 1) * len(FILES)


@pytest.mark.parametrize("hosts", [8, 16])
def test_a_file_still_arriving_is_handed_on_so_the_fleet_takes_about_one_hosts_time(hosts):
    """Chains: a host gives what it still receives, the seed what the origin still pushes, so the
    fleet's time is about S/B, not one file per doubling step (12 files of 10 units at bandwidth
    1: S/B = 120)."""
    random.seed(hosts)
    fleet = Fleet([f"h{n}" for n in range(hosts)], seed="h0")
    took = fleet.run()
    limit, one_file = sum(FILES.values()), max(FILES.values())
    assert fleet.streamed, "no host handed on a file it was still receiving"
    assert took <= limit + one_file / 2, f"{took} against S/B {limit}"
    assert all(fleet.have[name] == set(FILES) for name in fleet.names)


@pytest.mark.parametrize("hosts", [8, 16])
def test_the_set_up_of_each_copy_is_hidden_behind_the_copy_before_it(hosts):
    """A copy's set-up (the scheduler's word, the ssh session, the peer's give starting) costs
    every host that time per file where copies follow one another (12 files x 2 = 24 units
    over S/B here); the next copy set up behind the one read, and a new file handed down a
    chain in the order its members will be free, pays it about once."""
    random.seed(hosts)
    fleet = Fleet([f"h{n}" for n in range(hosts)], seed="h0", setup=2.0)
    took = fleet.run()
    limit, one_file = sum(FILES.values()), max(FILES.values())
    assert took <= limit + 2.0 + one_file / 2, f"{took} against S/B {limit}"
    assert all(fleet.have[name] == set(FILES) for name in fleet.names)


@pytest.mark.parametrize("hosts", [4, 8, 16])
def test_no_member_gives_two_copies_read_at_once(hosts):
    """A member's second copy goes to the receiver of its first, which reads one at a time: two
    read at once would halve both (a benchmark run with any two receivers per giver: 0.41 of
    S/B at 16 hosts), and under model_transfer_limit_mbps the giver would send twice the cap."""
    random.seed(hosts)
    fleet = Fleet([f"h{n}" for n in range(hosts)], seed="h0", setup=1.0)
    fleet.run()
    assert fleet.shared == 0
    assert all(fleet.have[name] == set(FILES) for name in fleet.names)


def test_a_slow_member_that_alone_holds_files_still_gives_them():
    """Slowness is a preference: a fast member takes from a slow one what no other can give it,
    rather than being stopped for files "no host holds" (as a benchmark run was, before)."""
    fleet = Fleet(["a", "b", "c"], complete=["a"])
    fleet.swarm.members["a"].rate = 0.1
    fleet.swarm.members["b"].rate = fleet.swarm.members["c"].rate = 1.0
    fleet.run()
    assert fleet.ended == {name: "leave" for name in "abc"}
    assert {giver for _, _, giver in fleet.copies} >= {"a"}


def test_a_resumed_copy_is_timed_by_the_bytes_it_brought():
    """A copy that finds most of its file staged brings only the rest: timed by the whole file
    it would look ten times as fast, and every member of ordinary speed would look slow."""
    fleet = Fleet(["a", "b"], complete=["a"])
    fleet.swarm.event("a", {"event": "hello", "complete": True, "manifest": MANIFEST, "verified": sorted(FILES)})
    fleet.swarm.event("b", {"event": "hello", "complete": False, "manifest": None})
    fleet.swarm.event("b", {"event": "ready", "manifest": MANIFEST, "verified": []})
    member = fleet.swarm.members["b"]
    path = next(iter(member.fetching))
    fleet.now = 5.0
    fleet.swarm.event("b", {"event": "verified", "path": path, "peer": "a:22", "received": 4})
    assert member.rate == pytest.approx(4 / 5)


def test_a_copy_is_timed_by_its_reading_where_the_part_says_it():
    """The next copy is asked for while the one before it is read: timed from the scheduler's
    word it would count that wait, and every member would look half as fast as it is."""
    fleet = Fleet(["a", "b"], complete=["a"])
    fleet.swarm.event("a", {"event": "hello", "complete": True, "manifest": MANIFEST, "verified": sorted(FILES)})
    fleet.swarm.event("b", {"event": "hello", "complete": False, "manifest": None})
    fleet.swarm.event("b", {"event": "ready", "manifest": MANIFEST, "verified": []})
    member = fleet.swarm.members["b"]
    assert len(member.fetching) == 2, "the next copy is not set up behind the first"
    first, second = member.fetching
    fleet.now = 10.0
    fleet.swarm.event("b", {"event": "verified", "path": first, "peer": "a:22", "received": 10, "took": 10.0})
    fleet.now = 20.0
    fleet.swarm.event("b", {"event": "verified", "path": second, "peer": "a:22", "received": 10, "took": 5.0})
    assert member.rate == pytest.approx(10 / 5)


def test_a_copy_chained_to_one_that_ended_without_the_file_is_dropped_at_once():
    """Down a chain, a copy whose giver's own copy failed would wait for bytes that do not come
    (the giver's ``give`` gives up after 30 s, and so on down the chain: a benchmark run lost
    30 s so): it is dropped and taken up again from another giver."""
    sent = []
    swarm = Swarm(
        addresses={name: f"{name}:22" for name in ("s", "b", "c")},
        complete=set(),
        seed="s",
        manifest=MANIFEST,
        send=lambda name, message: sent.append((name, message)),
    )
    for name in ("s", "b", "c"):
        swarm.event(name, {"event": "hello", "complete": False, "manifest": None})
        swarm.event(name, {"event": "ready", "manifest": MANIFEST, "verified": []})
    path = sorted(FILES)[0]
    swarm.event("s", {"event": "arriving", "path": path})
    first = next(m for m in swarm.members.values() if path in m.fetching and m.fetching[path].giver == "s")
    second = next(m for m in swarm.members.values() if path in m.fetching and m.fetching[path].giver == first.name)
    assert second.fetching[path].chained
    swarm.event(first.name, {"event": "failed", "path": path, "peer": "s:22", "bad": False, "why": "cut"})
    assert (second.name, {"do": "cancel", "path": path}) in sent


def test_a_failure_said_of_another_file_does_not_end_the_copy_under_way():
    """A host's part says a copy failed, late, after the control node gave it the next one: only
    the copy of that file ends."""
    fleet = Fleet(["a", "b"], complete=["a"])
    fleet.swarm.event("a", {"event": "hello", "complete": True, "manifest": MANIFEST, "verified": sorted(FILES)})
    fleet.swarm.event("b", {"event": "hello", "complete": False, "manifest": None})
    fleet.swarm.event("b", {"event": "ready", "manifest": MANIFEST, "verified": []})
    member = fleet.swarm.members["b"]
    under_way = dict(member.fetching)
    other = next(path for path in FILES if path not in under_way)
    fleet.swarm.event("b", {"event": "failed", "path": other, "peer": "a:22", "bad": False, "why": "late"})
    assert member.fetching == under_way and fleet.swarm.members["a"].giving == len(under_way)
