"""glmfleet's deploy: bare GPU hosts to verified vLLM serving. Run `pyinfra INVENTORY deploy.py`.

Every host's configuration is validated before any operation is planned, so one bad value in
the inventory, group_data/ or --data stops the whole run with nothing changed.
"""

from pyinfra import host, inventory

from glmfleet.config import validate_inventory
from roles.verify import verify
from roles.vllm_service import vllm_service
from roles.vllm_venv import vllm_venv

validate_inventory(inventory)

venv_switched = vllm_venv()
started = vllm_service(restart_when=venv_switched)
verify(changes=started)
