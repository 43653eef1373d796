"""Dispatchers by name (`moe.backend`): how the routed (token, slot) rows reach the experts and come back.

An MoE layer is router + experts + dispatcher (megavq.moe.layer). The dispatcher builds the expert weights in
its own layout (`build_experts`; the layer registers them as `experts`) and runs them on the routing the
router gives:

  reference   a plain loop over experts (the oracle every fast path is tested against)
  native      dropless: rows sorted by expert, one matrix product per expert; with moe.ep_size > 1 the
              experts are sharded over an expert-parallel group and rows move by all-to-all (expert_parallel.py)
  deepspeed   DeepSpeed-MoE's capacity layer (deepspeed.moe.layer.MoE) driven by the router through its gate
  megablocks  MegaBlocks' dropless dMoE (CUDA only)

A new dispatcher is one file: a `Dispatcher` subclass registered with `@register_dispatcher(name)`, imported
below (or by the user's plugin file, see megavq.plugins).

Canonical layout: the native layout at ep_size 1, `experts.w_in` (E, 1|2, D, H), `experts.w_out` (E, H, D),
`experts.b_in` (E, 1|2, H), `experts.b_out` (E, D). Checkpoints and exports use it; `to_canonical` and
`from_canonical` convert the keys under one layer's `experts.` prefix (collective under expert parallelism:
call them on every rank).
"""
from megavq.moe.dispatch.base import (BankDispatcher, Dispatcher, Route, RowCounts, available_dispatchers,
                                      build_dispatcher, dispatcher_class, dispatchers_where, dropless_rows,
                                      register_dispatcher)
from megavq.moe.dispatch import native, reference, deepspeed, megablocks  # noqa: F401, I001  (register, in this order)

__all__ = ["BankDispatcher", "Dispatcher", "Route", "RowCounts", "available_dispatchers", "build_dispatcher",
           "dispatcher_class", "dispatchers_where", "dropless_rows", "register_dispatcher"]
