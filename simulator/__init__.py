"""LLM decoding performance simulator: hardware profiles, model specs, cost model, serving simulation."""

from simulator.errors import UserError
from simulator.hardware import HardwareProfile, load_profile
from simulator.models import ModelSpec, load_model

__all__ = ["HardwareProfile", "ModelSpec", "UserError", "load_model", "load_profile"]
