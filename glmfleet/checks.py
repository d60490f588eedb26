"""Value checks for settings: each one a test and the words that say what it accepts, so the
error message and README's table are derived from the test itself and cannot drift from it.

Every string a setting holds, at any depth, is refused first if it has a control character
(``config.problems``): no value that reaches a command line, a unit, an env file, nginx's
configuration or authorized_keys may hold a newline, a NUL or an escape.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit


@dataclass(frozen=True)
class Check:
    """``test(value)`` says whether a value is accepted; ``accepted`` says so in words."""

    test: Callable[[Any], bool]
    accepted: str
    urls: bool = False  # the value is a URL, or a list of URLs, that may carry credentials

    def __call__(self, value: Any) -> bool:
        try:
            return bool(self.test(value))
        except (TypeError, ValueError):
            return False


# C0 and C1 controls, DEL, and the Unicode line and paragraph separators (line breaks to Python).
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def control_characters(value: Any) -> bool:
    """Whether any string in ``value`` (lists and mappings searched, keys too) has a control character."""
    if isinstance(value, str):
        return CONTROL.search(value) is not None
    if isinstance(value, (list, tuple)):
        return any(map(control_characters, value))
    if isinstance(value, dict):
        return any(control_characters(k) or control_characters(v) for k, v in value.items())
    return False


def is_str(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def spoken(choices) -> str:
    words = [repr(choice) for choice in choices]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def text(accepted: str = "a string") -> Check:
    return Check(is_str, accepted)


def word(accepted: str = "a string without spaces") -> Check:
    """One word: no whitespace (names that travel as one argument or one HTTP header value)."""
    return Check(lambda v: is_str(v) and not any(c.isspace() for c in v), accepted)


def printable_ascii(accepted: str) -> Check:
    return Check(lambda v: is_str(v) and re.fullmatch(r"[\x21-\x7e]+", v) is not None, accepted)


def int_in(low: int, high: int) -> Check:
    return Check(lambda v: type(v) is int and low <= v <= high, f"an integer {low}-{high}")


def number_in(low: float, high: float, accepted: str | None = None) -> Check:
    """A number in the half-open range (low, high]."""
    return Check(lambda v: type(v) in (int, float) and low < v <= high, accepted or f"a number > {low} and <= {high}")


def gigabytes(high: int) -> Check:
    return Check(lambda v: type(v) in (int, float) and 0 <= v <= high, f"a number 0-{high}")


boolean = Check(lambda v: type(v) is bool, "true or false")


def one_of(*choices: str) -> Check:
    return Check(
        lambda v: v in choices, spoken(choices) if len(choices) < 4 else "one of " + ", ".join(map(repr, choices))
    )


def optional(check: Check) -> Check:
    return Check(lambda v: v is None or check(v), f"None or {check.accepted}", check.urls)


def list_of(check: Check, accepted: str) -> Check:
    return Check(lambda v: isinstance(v, list) and all(check(item) for item in v), accepted, check.urls)


def mapping(key: Check, value: Check, accepted: str) -> Check:
    return Check(lambda v: isinstance(v, dict) and all(key(k) and value(item) for k, item in v.items()), accepted)


def matches(pattern: str, accepted: str) -> Check:
    compiled = re.compile(pattern)
    return Check(lambda v: isinstance(v, str) and compiled.fullmatch(v) is not None, accepted)


def version(example: str) -> Check:
    return matches(r"[0-9][A-Za-z0-9.+!_-]*", f"a version such as {example!r}")


# PEP 508's name: what pip and uv take for a distribution.
package_name = matches(r"[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9._-]*[A-Za-z0-9]", "a package name (PEP 508), such as 'vllm'")

# ``name==version`` (extras allowed): a pin, not a range, so re-runs install the same.
pinned_requirement = matches(
    r"[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9,._-]+\])?==[A-Za-z0-9.+!_-]+", "a 'name==version' pin"
)

sha256 = matches(r"[0-9a-f]{64}", "64 hex digits")
env_name = matches(r"[A-Za-z_][A-Za-z0-9_]*", "a variable name")


# --- paths ---------------------------------------------------------------------------------

# One path component as glmfleet writes paths into units, env files, authorized_keys and nginx
# configuration: no whitespace, quotes, backslashes, ``$`` or ``%``, so no file syntax needs them
# escaped (they would be quoted if they came, but need not come).
PATH = re.compile(r"(/[A-Za-z0-9._+@=:,~-]+)+")


def is_abs_path(value: Any) -> bool:
    """Absolute and normal: ``/a/b``, no ``.``, ``..``, empty or trailing components."""
    return (
        isinstance(value, str)
        and PATH.fullmatch(value) is not None
        and posixpath.normpath(value) == value
        and not {".", ".."} & set(value.split("/"))
    )


abs_path = Check(is_abs_path, "an absolute, normalised path of letters, digits and . _ + @ = : , ~ - (no spaces)")

# The FHS's top-level directories, and the well-known ones below /usr and /var: never a
# directory glmfleet owns, chowns or empties.
SYSTEM_DIRS = frozenset(
    {
        "/",
        "/bin",
        "/boot",
        "/dev",
        "/etc",
        "/home",
        "/lib",
        "/lib32",
        "/lib64",
        "/libx32",
        "/media",
        "/mnt",
        "/opt",
        "/proc",
        "/root",
        "/run",
        "/sbin",
        "/snap",
        "/srv",
        "/sys",
        "/tmp",
        "/usr",
        "/var",
    }
)
SYSTEM_SUBTREE_ROOTS = ("/usr", "/var")
# Nothing glmfleet owns may live here: volatile, virtual, shared with every user, or the system's configuration.
FORBIDDEN_TREES = (
    "/proc",
    "/sys",
    "/dev",
    "/run",
    "/tmp",
    "/var/tmp",
    "/boot",
    "/etc",
    "/root",
    "/lib",
    "/bin",
    "/sbin",
)


def is_system_dir(path: str) -> bool:
    parent = posixpath.dirname(path)
    return (
        path in SYSTEM_DIRS
        or (parent in SYSTEM_SUBTREE_ROOTS and path.count("/") == 2)
        or any(path == tree or path.startswith(tree + "/") for tree in FORBIDDEN_TREES)
    )


owned_dir = Check(
    lambda v: is_abs_path(v) and not is_system_dir(v),
    f"{abs_path.accepted[:-1]}, not a system directory (such as /, /usr, /var/lib) or inside "
    + ", ".join(FORBIDDEN_TREES)
    + ")",
)


def inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


local_path = Check(lambda v: is_str(v) and v.startswith("/"), "an absolute path on the control node")

# A command on the host's PATH, or an absolute path to one.
command = Check(
    lambda v: is_abs_path(v) or re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", str(v)) is not None,
    "a command name or absolute path",
)


# --- addresses and URLs -------------------------------------------------------------------------


def is_ip(value: Any) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


listen_address = Check(is_ip, "an IP address such as '127.0.0.1' or '0.0.0.0'")

HOSTNAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)
host_or_address = Check(
    lambda v: is_ip(v) or (isinstance(v, str) and HOSTNAME.fullmatch(v) is not None), "a host name or IP address"
)


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def is_url(value: Any, schemes=("http", "https", "file")) -> bool:
    """A URL the hosts' tools can fetch: a known scheme, a host for http(s), no whitespace."""
    if not is_str(value) or any(c.isspace() for c in value) or CONTROL.search(value):
        return False
    parts = urlsplit(value)
    if parts.scheme not in schemes:
        return False
    if parts.scheme == "file":
        return parts.path.startswith("/")
    try:
        parts.port  # noqa: B018 - raises for a port that is not a number in range
    except ValueError:
        return False
    return bool(parts.hostname)


url = Check(is_url, "an http(s) or file URL", urls=True)
http_url = Check(lambda v: is_url(v, ("http", "https")), "an http(s) URL", urls=True)


def url_template(*placeholders: str) -> Check:
    """A URL that may hold ``{name}`` placeholders, the hosts' values filled in per host; any
    other placeholder, or a stray brace, is refused."""
    named = " and ".join("{" + p + "}" for p in placeholders)

    def test(value):
        fields = [field for _, field, _, _ in string.Formatter().parse(value) if field is not None]
        return set(fields) <= set(placeholders) and is_url(value.format(**{p: "x" for p in placeholders}))

    return Check(test, f"an http(s) or file URL (placeholders: {named})", urls=True)


def url_credentials(value: str) -> tuple[str, str, str] | None:
    """``(host, user, password)``, decoded, where an http(s) URL carries credentials, else None."""
    parts = urlsplit(value)
    if parts.scheme in ("http", "https") and (parts.username or parts.password):
        return parts.hostname, unquote(parts.username or ""), unquote(parts.password or "")
    return None


def without_credentials(value: str) -> str:
    """The URL without its ``user:password@``."""
    parts = urlsplit(value)
    if not (parts.username or parts.password):
        return value
    netloc = parts.netloc.rsplit("@", 1)[1]
    return parts._replace(netloc=netloc).geturl()


URL_WITH_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s]*)@")


def redact(text: str) -> str:
    """``text`` with the credentials of every URL in it masked: for messages and output."""
    return URL_WITH_CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['userinfo'].split(':', 1)[0]}:***@", text)
