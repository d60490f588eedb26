"""glmfleet's deploy: bare GPU hosts to verified vLLM serving. Run `pyinfra INVENTORY deploy.py`.

Every host's configuration is validated before any operation is planned, so one bad value in
the inventory, group_data/ or --data stops the whole run with nothing changed.
"""

from pyinfra import inventory

from glmfleet.config import validate_inventory
from roles.container_toolkit import container_toolkit
from roles.glm4_patch import glm4_patch
from roles.model_weights import model_weights
from roles.nvidia_driver import nvidia_driver
from roles.preflight import preflight
from roles.verify import verify
from roles.vllm_flags import vllm_flags
from roles.vllm_image import vllm_image
from roles.vllm_service import vllm_service
from roles.vllm_venv import vllm_venv

validate_inventory(inventory)

preflight()
driver = nvidia_driver()
toolkit_changed = container_toolkit(driver=driver)
runtime_changed = [*vllm_venv(), *vllm_image(), *glm4_patch()]
# Weights need no GPU: they are fetched even on a host that waits for its reboot. A host whose
# weights fail to complete fails here, so its vLLM is never started.
new_weights = model_weights()
# A bad flag fails the host here, before the running unit is replaced.
vllm_flags()
# Serving needs the GPU: a host waiting for its reboot into the new driver stops here.
if driver.ready:
    started = vllm_service(restart_when=[*runtime_changed, *new_weights, *toolkit_changed, *driver.changes])
    verify(changes=started)
