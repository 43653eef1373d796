"""Routers by name: `build_router(name, hidden_size=..., num_experts=..., top_k=..., **options)`."""
from megavq.moe.routers.base import (Router, RouterOutput, available_routers, build_router, load_balance_loss,
                                     register, router_class, routing_metrics)
from megavq.moe.routers import topk  # noqa: F401  (registers)

__all__ = ["Router", "RouterOutput", "available_routers", "build_router", "load_balance_loss", "register",
           "router_class", "routing_metrics"]
