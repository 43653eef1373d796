"""Routers by name: `build_router(name, hidden_size=..., num_experts=..., top_k=..., **options)`."""
from megavq.moe.routers.base import (Router, RouterOutput, available_routers, build_router, load_balance_loss,
                                     register, router_class, routing_metrics)
from megavq.moe.routers import (compete, expert_choice, soft, topk, usmoe, vq,  # noqa: F401  (register)
                                xmoe)

__all__ = ["Router", "RouterOutput", "available_routers", "build_router", "load_balance_loss", "register",
           "router_class", "routing_metrics"]
