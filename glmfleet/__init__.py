"""glmfleet: turn bare GPU hosts into a fleet that serves GLM models with vLLM."""

import functools
from pathlib import Path

import jinja2

# Templates, patches and the scripts that run on the hosts.
FILES = Path(__file__).resolve().parent.parent / "files"


@functools.cache
def template(name: str) -> jinja2.Template:
    """A template from files/, compiled once per process (each host renders it; compiling it
    is most of the cost). A value the template uses and is not given is an error."""
    return jinja2.Template((FILES / name).read_text(), undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
