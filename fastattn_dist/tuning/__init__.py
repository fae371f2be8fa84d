"""How ``tiles="auto"`` plans: the cost model (cost_model.py) and the plans measured on a GPU (measured.py)."""
from .cost_model import (BlockCost, CommOption, DeviceProfile, LayerCost, MeasuredPlans, PROFILES, Prediction,
                         TilePlanOptions, choose, choose_plan, choose_stack_plan, fixed_plan, plans_to_time,
                         profile_for, simulate, simulate_stack, tile_streams_for)
from .measured import lookup, profile_path, store

__all__ = ["BlockCost", "CommOption", "DeviceProfile", "LayerCost", "MeasuredPlans", "PROFILES", "Prediction",
           "TilePlanOptions", "choose", "choose_plan", "choose_stack_plan", "fixed_plan", "plans_to_time",
           "profile_for", "simulate", "simulate_stack", "tile_streams_for", "lookup", "profile_path", "store"]
