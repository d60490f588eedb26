"""The local test fleet and the demo: development tools of this repository, not installed with glmfleet."""
