"""glmfleet's own operations against spec files (tests/plan/operation_specs/<module.operation>/*.yaml):
the facts an operation sees and the exact commands it must yield, run by pyinfra-testing."""

from pathlib import Path

from pyinfra_testing.operations import make_operation_tests

SPECS = Path(__file__).parent / "operation_specs"

for operation_path in sorted(d.name for d in SPECS.iterdir() if d.is_dir()):
    locals()[f"Test_{operation_path}"] = make_operation_tests("glmfleet", operation_path, SPECS / operation_path)
