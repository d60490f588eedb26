"""glmfleet: turn bare GPU hosts into a fleet that serves GLM models with vLLM."""
