"""`glmfleet models`: the catalog as the README's model table, with the hosts each entry needs."""

from __future__ import annotations

from glmfleet import catalog, compat

# The GPU memory nvidia-smi reports on the two kinds of 8-GPU host the table sizes against
# (MiB, from tests/fixtures/h100 and tests/fixtures/h200).
HOSTS = (("8×H100 80GB", 81559), ("8×H200", 143771))
GPUS_PER_HOST = 8


def hosts_cell(entry: catalog.Model, memory_mib: int) -> str:
    """One host's tensor parallel size, or how many hosts one replica spans, at the native context."""
    memory_gib = memory_mib / 1024
    tp = compat.recommend_tp(entry, memory_gib)
    if tp is not None:
        return f"1 (TP {tp})"
    hosts = compat.hosts_needed(entry, GPUS_PER_HOST, memory_gib, 0.9, entry.context)
    return f"{hosts}" if hosts is not None else "more than 16"


def models_table() -> str:
    rows = [
        "| name | repo | weights | vLLM: first, checked | parsers: tool, reasoning | MTP | "
        + " | ".join(f"hosts of {name}" for name, _ in HOSTS)
        + " |",
        "|---|---|---|---|---|---|" + "---|" * len(HOSTS),
    ]
    for entry in catalog.load().models.values():
        settings = entry.defaults_for(entry.vllm_checked)
        weights = f"{entry.weights_gib:.0f} GiB {entry.precision}" + ("" if entry.weights_measured else " (≥)")
        parsers = ", ".join(settings.get(key) or "-" for key in ("vllm_tool_call_parser", "vllm_reasoning_parser"))
        mtp = "-" if entry.mtp_tokens is None else f"{entry.mtp_tokens}" + (" (on)" if entry.mtp_by_default else "")
        cells = [
            f"`{entry.name}`",
            entry.hf,
            weights,
            f"{entry.vllm_min}, {entry.vllm_checked}",
            parsers,
            mtp,
            *(hosts_cell(entry, memory) for _, memory in HOSTS),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)
