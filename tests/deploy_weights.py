"""The weights role alone (the weights fleet tests and benchmark): validate, then model_weights.

deploy.py runs the same role between the venv and the service; alone it needs no vLLM.
"""

from pyinfra import inventory

from glmfleet.config import validate_inventory
from roles.model_weights import model_weights

validate_inventory(inventory)
model_weights()
