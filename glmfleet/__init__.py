"""glmfleet: turn bare GPU hosts into a fleet that serves GLM models with vLLM."""

from pathlib import Path

# Templates, patches and the scripts that run on the hosts.
FILES = Path(__file__).resolve().parent.parent / "files"
