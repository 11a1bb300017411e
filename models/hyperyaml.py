"""Read upstream's hyperpyyaml configs as data, without executing their tags.

Upstream configs build objects with `!new:module.Class`, `!name:func`, `!apply:func` and refer to
top-level values with `!ref <name>` (also `!ref <a> * <b>`). We need only the hyper-parameters, so
every tagged node becomes a `Tagged(tag, target, value)` record and `!ref` is resolved against the
top-level keys. Nothing is imported or called.
"""

from __future__ import annotations

import ast
import operator
import re
from dataclasses import dataclass

import yaml

from models.errors import UserError


@dataclass
class Tagged:
    tag: str  # "new", "name", "apply", ...
    target: str  # e.g. "cosyvoice.llm.llm.CosyVoice3LM"
    value: object  # the node's mapping / sequence / scalar

    @property
    def kwargs(self) -> dict:
        return self.value if isinstance(self.value, dict) else {}

    @property
    def class_name(self) -> str:
        return self.target.rsplit(".", 1)[-1]


@dataclass
class _Ref:
    expr: str


class _Loader(yaml.SafeLoader):
    pass


def _construct_tagged(loader, suffix, node):
    if isinstance(node, yaml.MappingNode):
        value = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)
    tag, _, target = suffix.partition(":")
    return Tagged(tag, target, value)


_Loader.add_multi_constructor("!", _construct_tagged)
_Loader.add_constructor("!ref", lambda loader, node: _Ref(loader.construct_scalar(node)))

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv}


def _arith(expr: str):
    def walk(n):
        if isinstance(n, ast.Expression):
            return walk(n.body)
        if isinstance(n, ast.Constant) and isinstance(n.value, (int, float)):
            return n.value
        if isinstance(n, ast.BinOp) and type(n.op) in _BINOPS:
            return _BINOPS[type(n.op)](walk(n.left), walk(n.right))
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub):
            return -walk(n.operand)
        raise ValueError(expr)

    return walk(ast.parse(expr, mode="eval"))


def load_hyperyaml(path: str, overrides: dict | None = None) -> dict:
    """Parse `path` into plain data plus `Tagged` records, with `!ref`s resolved."""
    try:
        with open(path) as f:
            raw = yaml.load(f, Loader=_Loader)
    except yaml.YAMLError as e:
        raise UserError(f"config {path} is not valid YAML ({str(e).splitlines()[0]}).", "restore the upstream yaml file") from None
    if not isinstance(raw, dict):
        raise UserError(f"config {path} is not a mapping of hyper-parameters.", "restore the upstream yaml file")
    raw.update(overrides or {})

    def resolve(node, depth=0):
        if depth > 50:
            raise UserError(f"config {path} has circular !ref entries.", "restore the upstream yaml file")
        if isinstance(node, _Ref):
            names = re.findall(r"<([^>]+)>", node.expr)
            if len(names) == 1 and node.expr.strip() == f"<{names[0]}>":
                if names[0] not in raw:
                    raise UserError(f"config {path}: !ref <{names[0]}> names no top-level key.", "restore the upstream yaml file")
                return resolve(raw[names[0]], depth + 1)
            expr = node.expr
            for n in names:
                expr = expr.replace(f"<{n}>", repr(resolve(raw[n], depth + 1)))
            return _arith(expr)
        if isinstance(node, Tagged):
            return Tagged(node.tag, node.target, resolve(node.value, depth + 1))
        if isinstance(node, dict):
            return {k: resolve(v, depth + 1) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v, depth + 1) for v in node]
        return node

    return {k: resolve(v) for k, v in raw.items()}
