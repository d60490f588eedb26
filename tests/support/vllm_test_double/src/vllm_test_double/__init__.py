"""TEST DOUBLE for vLLM -- it serves no model.

`vllm-test-double` stands in for vLLM on glmfleet's GPU-less test hosts. Its
`vllm` console script accepts `vllm serve MODEL [flags]` as the real one does
and answers vLLM's OpenAI-compatible HTTP API (/health, /v1/models,
/v1/chat/completions, /v1/completions, /metrics, /version) with deterministic
replies that echo the prompt. Nothing is loaded onto any GPU.
"""

from importlib.metadata import version

__version__ = version("vllm-test-double")
