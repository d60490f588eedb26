"""glmfleet's deploy: bare GPU hosts to verified vLLM serving. Run `pyinfra INVENTORY deploy.py`.

Every host's configuration is validated before any operation is planned, so one bad value in
the inventory, group_data/ or --data stops the whole run with nothing changed.
"""

from pyinfra import host, inventory

from glmfleet.config import validate_inventory
from roles.glm4_patch import glm4_patch
from roles.preflight import preflight
from roles.verify import verify
from roles.vllm_flags import vllm_flags
from roles.vllm_service import vllm_service
from roles.vllm_venv import vllm_venv

validate_inventory(inventory)

preflight()
venv_switched = vllm_venv()
patched = glm4_patch()
vllm_flags()
started = vllm_service(restart_when=[*venv_switched, *patched])
verify(changes=started)
