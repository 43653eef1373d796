"""Routers by name: `build_router(name, hidden_size=..., num_experts=..., top_k=..., **options)`."""
from megavq.moe.routers.base import (HealthLimits, Router, RouterOutput, available_routers, build_router,
                                     hf_router_name, load_balance_loss, recomputing, recorded_options, register,
                                     router_class, routing_metrics)
from megavq.moe.routers import (compete, expert_choice, soft, topk, usmoe, vq,  # noqa: F401  (register)
                                xmoe)

__all__ = ["HealthLimits", "Router", "RouterOutput", "available_routers", "build_router", "hf_router_name",
           "load_balance_loss", "recomputing", "recorded_options", "register", "router_class", "routing_metrics"]
