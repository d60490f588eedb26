"""The weights role alone (the weights fleet tests and benchmark): validate, then model_weights.

deploy.py runs the same role between the venv and the service, its facts asked with every
role's in one command per host; alone it needs no vLLM.
"""

from pyinfra import inventory

from glmfleet.config import validate_inventory
from roles import ask_roles, model_weights, prepare_control_node

validate_inventory(inventory)
prepare_control_node(inventory)
ask_roles((model_weights,))
model_weights.model_weights()
