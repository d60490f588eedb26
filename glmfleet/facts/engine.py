"""How glmfleet asks hosts: each fact once per host and run (``ask``), and every role's questions
in a single command per host (``ask_together``).

pyinfra asks a fact again on every call and each is a command of its own, so each fact gathers
all it needs in one command, ``ask`` asks it once per host and run, and each role declares its
questions so that ``ask_together`` can ask them all in one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple
from weakref import WeakKeyDictionary

from gevent.event import Event
from pyinfra.api import FactBase, State, StringCommand
from pyinfra.api.exceptions import FactProcessError
from pyinfra.api.host import Host

from glmfleet.shell import quote

_ANSWERS: WeakKeyDictionary[State, dict] = WeakKeyDictionary()
_ASKING: WeakKeyDictionary[State, dict[tuple, Event]] = WeakKeyDictionary()


class Question(NamedTuple):
    """A fact and its arguments: one thing a role reads from a host."""

    fact: type[FactBase]
    kwargs: dict

    def of(self, host: Host):
        return ask(host, self.fact, **self.kwargs)


def _key(host: Host, question: Question) -> tuple:
    return host.name, question.fact, repr(sorted(question.kwargs.items()))


def ask(host: Host, fact_cls: type[FactBase], **kwargs):
    """``host.get_fact``, asked once per host and run: pyinfra asks the host again on every call.

    Sound because every role asks while planning, before anything in the run changes the host;
    each run (a rollout makes several) has its own State and so its own answers.
    """
    answers = _ANSWERS.setdefault(host.state, {})
    key = _key(host, Question(fact_cls, kwargs))
    _wait_for(host, [key])
    if key not in answers:
        with _asking(host, [key]):
            answers[key] = host.get_fact(fact_cls, **kwargs)
    return answers[key]


def ask_together(host: Host, questions: dict[str, Question]) -> dict:
    """The answers to ``questions`` (by the same names); those not asked yet in this run are
    asked in one command.

    Each command is an SSH session of its own on the host and, on one host, a round trip
    after the last: the roles' dozen questions cost one. The questions of a fact that can
    merge them (``merged`` and ``part``, as ``ManagedPaths``) are asked as one. A question
    whose command fails, or whose ``requires_command`` is missing, is left to ``ask``, so
    that pyinfra reports it as it reports any fact.
    """
    answers = _ANSWERS.setdefault(host.state, {})
    keyed = {_key(host, q): q for q in questions.values()}
    _wait_for(host, keyed)
    new = {key: q for key, q in keyed.items() if key not in answers}
    if new:
        with _asking(host, new):
            batch = merged_questions(list(new.values()))
            facts = [(asked.fact(), asked) for asked, _ in batch]
            # A batch that fails as a whole (not one of its parts) leaves every question to ask.
            parts = host.get_fact(
                Together, commands=[together_part(fact, asked.kwargs) for fact, asked in facts], _ignore_errors=True
            )
            for (fact, _), (_, answered), (status, lines) in zip(facts, batch, parts):
                if status != 0:
                    continue
                try:
                    answer = fact.process(lines) if lines else fact.default()
                except FactProcessError:
                    continue
                for q in answered:
                    answers[_key(host, q)] = q.fact.part(answer, **q.kwargs) if hasattr(q.fact, "part") else answer
    return {name: q.of(host) for name, q in questions.items()}


@contextmanager
def _asking(host: Host, keys) -> Iterator[None]:
    """Marks ``keys`` as being asked of ``host``. pyinfra plans hosts side by side in greenlets,
    and one host's plan may read another's facts (the peer fan-out reads every host's
    weights): a greenlet that needs them meanwhile waits for this answer instead of asking again."""
    asking = _ASKING.setdefault(host.state, {})
    done = Event()
    for key in keys:
        asking[key] = done
    try:
        yield
    finally:
        for key in keys:
            asking.pop(key, None)
        done.set()


def _wait_for(host: Host, keys) -> None:
    asking = _ASKING.get(host.state, {})
    for done in {id(asking[key]): asking[key] for key in keys if key in asking}.values():
        done.wait()


def merged_questions(questions: list[Question]) -> list[tuple[Question, list[Question]]]:
    """The questions to ask, each with those its answer answers: all of a fact's questions as
    one where the fact can merge them, the others each alone."""
    batch: list[tuple[Question, list[Question]]] = []
    by_fact: dict[type[FactBase], list[Question]] = {}
    for q in questions:
        if hasattr(q.fact, "merged"):
            by_fact.setdefault(q.fact, []).append(q)
        else:
            batch.append((q, [q]))
    batch += [(Question(fact, fact.merged([q.kwargs for q in group])), group) for fact, group in by_fact.items()]
    return batch


def together_part(fact: FactBase, kwargs: dict) -> str:
    """A fact's command as one part of ``Together``: in a subshell (an ``exit`` ends only the
    part), first failing with 127 where its ``requires_command`` is missing."""
    command = fact.command(**kwargs) if callable(fact.command) else fact.command
    if isinstance(command, StringCommand):  # str() would show masked values as masked
        command = command.get_raw_value()
    requires = fact.requires_command(**kwargs) if callable(fact.requires_command) else fact.requires_command
    check = f"command -v {quote(requires)} >/dev/null 2>&1 || exit 127; " if requires else ""
    # The newline ends a trailing comment or heredoc of the fact's command inside its part.
    return f"( {check}{command}\n)"


TOGETHER = "::glmfleet-part::"


class Together(FactBase):
    """Several facts' commands run in one, each part's output lines with its exit status.

    .. code:: python

        [(0, ["line", ...]), (127, [])]
    """

    default = list

    def command(self, commands: list[str]) -> str:
        return "; ".join(f"echo '{TOGETHER}'; {command}; echo \"{TOGETHER} $?\"" for command in commands)

    def process(self, output):
        parts, lines = [], []
        for line in output:
            before, marker, status = line.partition(TOGETHER)
            if before or not marker:  # a part's output may lack its last newline
                lines.append(before)
            if marker and status:
                parts.append((int(status), lines))
            elif marker:
                lines = []
        return parts
