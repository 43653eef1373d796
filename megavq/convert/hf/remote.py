"""Hugging Face export with the model's own modelling code, for models that no transformers architecture holds:
routers whose evaluation-time routing is not softmax top-k (vq, xmoe, usmoe with token selection, any other
causal router), and backbones that are not Llama's (LayerNorm, learned positions, GELU, biases).

The directory, loadable with `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`:
  config.json                 MegavqConfig (template/configuration_megavq.py beside this file), auto_map to the files
                              below
  model.safetensors           the weights under megavq's names (prefixed `model.`, but lm_head.weight); sharded
                              (model-0000i-of-0000n.safetensors + model.safetensors.index.json) when large
  configuration_megavq.py,    template/ beside this file, copied: the config class, and the transformer with
  modeling_megavq.py          transformers' KV cache and GenerationMixin (torch and transformers only)
  megavq_routers_<sha>.py     generated: the source of the model's router module and of the megavq modules it
                              imports (megavq.moe.routers.base, megavq.errors, ...), dependencies first, with the
                              megavq imports removed; the router runs in evaluation mode exactly as in megavq.
                              Its name carries the first 12 hex digits of its sha256, and the config file ends with
                              the sha256 of the modelling code: transformers caches remote modules by file name and
                              (4.x) directory name, and keeps the model class it first registered for a config class,
                              so exports with different code get their own modules in one process
Non-causal routers (a token's routing depends on later tokens) cannot run a causal language model token by token
and are refused.
"""
from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import inspect
from pathlib import Path

from megavq.errors import MegavqError
from megavq.moe.routers import router_class
from megavq.moe.config import router_options

TEMPLATE = Path(__file__).resolve().parent / "template"
MODEL_FILES = ("configuration_megavq.py", "modeling_megavq.py")
ROUTERS_MODULE = "megavq_routers"  # + "_<sha>" in an export
ROUTERS_IMPORT = "from .megavq_routers import build_router"  # the template's line, pointed at the export's module
AUTO_MAP = {"AutoConfig": "configuration_megavq.MegavqConfig",
            "AutoModelForCausalLM": "modeling_megavq.MegavqForCausalLM"}
ARCHITECTURE = "MegavqForCausalLM"
ROUTERS_HEADER = '''"""megavq's routers, copied from its source by megavq's export (do not edit): the modules below,
dependencies first, with their megavq imports removed. modeling_megavq.py builds each MoE layer's router with
build_router."""
from __future__ import annotations
'''


def check_remote(cfg) -> None:
    """Refuse what the modelling code cannot run: a non-causal router (or one not of the token-routing kind), and
    the options of imported architectures it does not have (head size, QK-norm, clipping, shared experts, dense
    blocks among MoE blocks)."""
    m, moe = cfg.model, cfg.moe
    options = {"model.head_dim": m.head_dim, "model.qk_norm": m.qk_norm != "none", "model.clip_qkv": m.clip_qkv,
               "moe.shared_experts": moe.shared_experts, "moe.dense_layers": moe.dense_layers}
    used = [key for key, value in options.items() if value]
    if used:
        raise MegavqError(f"cannot export to Hugging Face with its own modelling code: it has no {', '.join(used)}; "
                          f"export with --format megavq instead")
    if not cfg.moe.every:
        return
    cls = router_class(cfg.moe.router)
    if cls.layer_kind != "token" or not cls.is_causal(cfg.moe.router_options):
        raise MegavqError(f"cannot export to Hugging Face: moe.router={cfg.moe.router} is not causal (a token's "
                          f"routing depends on later tokens), so a causal language model cannot run it token by "
                          f"token; export with --format megavq instead")


# ---- config and weights -----------------------------------------------------------------------------------
def remote_config_fields(cfg) -> dict:
    """MegavqConfig's arguments for a megavq Config."""
    m, moe = cfg.model, cfg.moe
    layers = None if not moe.every else {
        "every": moe.every, "router": moe.router, "router_options": router_options(moe),
        "num_experts": moe.num_experts, "top_k": moe.top_k, "d_expert": moe.d_expert}
    return dict(vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.d_ff, num_hidden_layers=m.n_layers,
                num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads or m.n_heads,
                max_position_embeddings=m.seq_len, rope_theta=m.rope_theta, norm_eps=m.norm_eps, norm=m.norm,
                pos=m.pos, mlp=m.mlp, qkv_bias=m.qkv_bias, out_bias=m.out_bias, mlp_bias=m.mlp_bias,
                tie_word_embeddings=m.tie_embeddings, initializer_range=m.init_std, moe=layers,
                megavq_config=cfg.to_dict())


def config_class():
    """MegavqConfig, imported from the template file (it needs transformers, not megavq)."""
    spec = importlib.util.spec_from_file_location("megavq_hf_configuration", TEMPLATE / MODEL_FILES[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MegavqConfig


def remote_config(cfg, special_ids: dict):
    config = config_class()(**remote_config_fields(cfg), **special_ids)
    config.architectures, config.auto_map = [ARCHITECTURE], dict(AUTO_MAP)
    return config


def remote_state_dict(model) -> dict:
    """megavq's state dict (canonical layout) under the modelling file's names: `model.` + name, but lm_head."""
    sd = {k if k == "lm_head.weight" else f"model.{k}": v for k, v in model.state_dict().items()}
    if model.cfg.model.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def megavq_state_dict(sd: dict) -> dict:
    """The inverse of remote_state_dict (import)."""
    return {k.removeprefix("model."): v for k, v in sd.items()}


# ---- the routers' source ----------------------------------------------------------------------------------
def _imported_module(node: ast.ImportFrom, name: str) -> str:
    """The megavq module that defines `name` of `from node.module import name` (a package resolves to the module
    its name comes from: `from megavq.moe.routers import Router` -> megavq.moe.routers.base)."""
    module = importlib.import_module(node.module)
    obj = getattr(module, name, None)
    if inspect.ismodule(obj):
        raise MegavqError(f"cannot copy the router's source: `from {node.module} import {name}` imports a module")
    if hasattr(module, "__path__"):  # a package
        return getattr(obj, "__module__", node.module)
    return node.module


def _megavq_import(node) -> bool:
    if isinstance(node, ast.Import):
        return any(a.name.split(".")[0] == "megavq" for a in node.names)
    return isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "megavq" and not node.level


def _parse(name: str) -> tuple[str, ast.Module]:
    source = inspect.getsource(importlib.import_module(name))
    tree = ast.parse(source)
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
        if _megavq_import(node) and (id(node) not in top or isinstance(node, ast.Import)):
            raise MegavqError(f"cannot copy the source of {name}: line {node.lineno} imports megavq inside a function "
                              f"or with `import megavq...`; use a module-level `from megavq... import name`")
    return source, tree


def _dependencies(tree: ast.Module) -> list[str]:
    return [_imported_module(node, a.name) for node in tree.body if _megavq_import(node) for a in node.names]


def module_closure(name: str) -> list[str]:
    """`name` and the megavq modules it imports, transitively, each after the modules it imports."""
    order: list[str] = []

    def visit(module: str, path: tuple) -> None:
        if module in order:
            return
        if module in path:
            raise MegavqError(f"cannot copy the router's source: import cycle {' -> '.join(path + (module,))}")
        for dep in _dependencies(_parse(module)[1]):
            visit(dep, path + (module,))
        order.append(module)
    visit(name, ())
    return order


def _module_body(name: str) -> tuple[str, set[str]]:
    """The source of module `name` without its megavq and __future__ imports (an `as` alias becomes an assignment),
    and the top-level names it defines."""
    source, tree = _parse(name)
    lines = source.splitlines()
    cut: dict[int, tuple[int, list[str]]] = {}
    for node in tree.body:
        future = isinstance(node, ast.ImportFrom) and node.module == "__future__"
        if _megavq_import(node) or future:
            aliases = [f"{a.asname} = {a.name}" for a in node.names if a.asname and not future]
            cut[node.lineno - 1] = (node.end_lineno, aliases)
    out, i = [], 0
    while i < len(lines):
        if i in cut:
            end, aliases = cut[i]
            out += aliases
            i = end
        else:
            out.append(lines[i])
            i += 1
    return "\n".join(out), defined_names(tree)


def defined_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def routers_source(router: str | None) -> str:
    """The routers module of a model routed by `router` (None: a dense model, which needs build_router only)."""
    module = router_class(router).__module__ if router else "megavq.moe.routers.base"
    parts, seen = [ROUTERS_HEADER], {}
    for name in module_closure(module):
        body, names = _module_body(name)
        clash = sorted(n for n in names if n in seen and not n.startswith("__"))
        if clash:
            raise MegavqError(f"cannot copy the router's source: {name} and {seen[clash[0]]} both define {clash[0]}")
        seen.update(dict.fromkeys(names, name))
        parts.append(f"\n# ---- {name} " + "-" * max(4, 100 - len(name)) + f"\n{body.strip()}\n")
    source = "\n".join(parts)
    compile(source, ROUTERS_MODULE, "exec")
    return source


# ---- writing the directory --------------------------------------------------------------------------------
def modelling_files(router: str | None) -> dict[str, str]:
    """{file name: text} of the modelling code: the config and model template, and the routers module, named by its
    content (see the module docstring), with the model's import pointed at it."""
    config, modeling = ((TEMPLATE / name).read_text() for name in MODEL_FILES)
    routers = routers_source(router)
    module = f"{ROUTERS_MODULE}_{hashlib.sha256(routers.encode()).hexdigest()[:12]}"
    assert modeling.count(ROUTERS_IMPORT) == 1, "the template imports build_router from .megavq_routers once"
    modeling = modeling.replace(ROUTERS_IMPORT, f"from .{module} import build_router")
    digest = hashlib.sha256((modeling + routers).encode()).hexdigest()
    config += f"\n# the modelling code beside this file (modeling_megavq.py, {module}.py): sha256 {digest}\n"
    return {MODEL_FILES[0]: config, MODEL_FILES[1]: modeling, f"{module}.py": routers}


def save_remote(model, out_dir: Path, special_ids: dict, max_shard_size: int | str) -> None:
    """Config, weights and modelling files of `model` (a megavq Transformer) in out_dir."""
    from huggingface_hub import save_torch_state_dict
    cfg = model.cfg
    check_remote(cfg)
    for stale in out_dir.glob(f"{ROUTERS_MODULE}_*.py"):  # an earlier export's
        stale.unlink()
    for name, text in modelling_files(cfg.moe.router if cfg.moe.every else None).items():
        (out_dir / name).write_text(text)
    remote_config(cfg, special_ids).save_pretrained(out_dir)
    save_torch_state_dict(remote_state_dict(model), out_dir, max_shard_size=max_shard_size, metadata={"format": "pt"})
