"""The configuration reference, read from ``clora/config.py``: every TOML section and field with its
type (as written), default (from the Struct), the comment on its line, and the checks its
``validate()`` makes (the messages of its ``_fail`` / ``_positive`` calls).
"""

from __future__ import annotations

import ast
import io
import tokenize
import types
import typing
from pathlib import Path

import msgspec

from clora import config as config_module
from tools.ref_code import source_root

__all__ = ["FieldDoc", "SectionDoc", "config_catalog", "toml_value"]


class FieldDoc(msgspec.Struct, kw_only=True):
    name: str
    type: str
    default: str
    doc: str
    checks: list[str] = []


class SectionDoc(msgspec.Struct, kw_only=True):
    header: str  # "(top level)", "[model]", "[[experiments]]", "[experiments.lora]"
    struct: str
    doc: str
    fields: list[FieldDoc]
    notes: list[str] = []  # checks across fields or sections


def toml_value(value: object) -> str:
    """A default as it would be written in TOML (None: the field is left out)."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _type_text(annotation: ast.expr) -> str:
    """As written, except ``Literal['a', 'b']`` which reads ``"a" | "b"`` (the TOML values)."""
    if isinstance(annotation, ast.Subscript) and isinstance(annotation.value, ast.Name) \
            and annotation.value.id == "Literal":
        items = annotation.slice.elts if isinstance(annotation.slice, ast.Tuple) else [annotation.slice]
        return " | ".join(toml_value(i.value) for i in items if isinstance(i, ast.Constant))
    return ast.unparse(annotation)


def _comments(source: str) -> dict[int, str]:
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


def _message(node: ast.expr) -> str:
    if isinstance(node, ast.Constant):
        text = str(node.value)
    elif isinstance(node, ast.JoinedStr):
        text = "".join(
            str(p.value) if isinstance(p, ast.Constant) else "{" + ast.unparse(p.value).replace("self.", "") + "}"
            for p in node.values
        )
    else:
        text = ast.unparse(node)
    return text.split(", got")[0].strip()


def _check_targets(node: ast.expr, loops: dict[str, list[str]]) -> list[str]:
    """Field names a check's first argument points at ("engine.max_loras" -> max_loras)."""
    if isinstance(node, ast.Constant):
        last = str(node.value).rsplit(".", 1)[-1]
        return last.split("/")
    if isinstance(node, ast.JoinedStr) and node.values:
        tail = node.values[-1]
        if isinstance(tail, ast.Constant):
            return str(tail.value).rsplit(".", 1)[-1].split("/")
        if isinstance(tail, ast.FormattedValue) and isinstance(tail.value, ast.Name):
            return loops.get(tail.value.id, [])
    if isinstance(node, ast.Name):
        return loops.get(node.id, [])
    return []


def _path_text(node: ast.expr) -> str:
    if isinstance(node, ast.JoinedStr):
        return "".join(str(p.value) if isinstance(p, ast.Constant) else "*" for p in node.values)
    return str(node.value) if isinstance(node, ast.Constant) else ast.unparse(node)


def _checks(cls_node: ast.ClassDef) -> list[tuple[list[str], str, str]]:
    """(field names, path as written, message) of each check in the class's validate()."""
    out = []
    for fn in cls_node.body:
        if not (isinstance(fn, ast.FunctionDef) and fn.name == "validate"):
            continue
        loops: dict[str, list[str]] = {}
        for node in ast.walk(fn):  # `for field in ("a", "b")` and `for name, x in (("optim.beta1", ...), ...)`
            if not (isinstance(node, ast.For) and isinstance(node.iter, ast.Tuple)):
                continue
            if isinstance(node.target, ast.Name):
                loops[node.target.id] = [str(e.value) for e in node.iter.elts if isinstance(e, ast.Constant)]
            elif isinstance(node.target, ast.Tuple):
                for i, var in enumerate(node.target.elts):
                    if isinstance(var, ast.Name):
                        loops[var.id] = [str(e.elts[i].value).rsplit(".", 1)[-1] for e in node.iter.elts
                                         if isinstance(e, ast.Tuple) and isinstance(e.elts[i], ast.Constant)]
        for node in ast.walk(fn):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args:
                if node.func.id == "_fail" and len(node.args) >= 2:
                    message = _message(node.args[1])
                elif node.func.id == "_positive":
                    message = "must be > 0"
                else:
                    continue
                out.append((_check_targets(node.args[0], loops), _path_text(node.args[0]), message))
        for node in ast.walk(fn):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id.startswith("validate_"):
                out.append((["name"], "name", f"checked by {node.func.id}()"))
    return out


def _struct_of(annotation: object) -> tuple[type | None, bool]:
    """(config Struct inside a field's type, whether it is a tuple of them); ``X | None`` is X."""
    members = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(members) == 1:
        annotation = members[0]
    if isinstance(annotation, type) and issubclass(annotation, msgspec.Struct):
        return annotation, False
    if typing.get_origin(annotation) is tuple:
        args = typing.get_args(annotation)
        if args and isinstance(args[0], type) and issubclass(args[0], msgspec.Struct):
            return args[0], True
    return None, False


def config_catalog(root: Path | None = None) -> list[SectionDoc]:
    """Sections in TOML order, starting from RuntimeConfig."""
    source = ((root or source_root()) / "clora" / "config.py").read_text()
    tree = ast.parse(source)
    comments = _comments(source)
    class_nodes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    sections: list[SectionDoc] = []

    def visit(cls: type, header: str) -> None:
        node = class_nodes[cls.__name__]
        annotations = {s.target.id: s for s in node.body if isinstance(s, ast.AnnAssign)
                       and isinstance(s.target, ast.Name)}
        hints = typing.get_type_hints(cls)
        checks = _checks(node)
        fields, children = [], []
        for f in msgspec.structs.fields(cls):
            stmt = annotations[f.name]
            child, many = _struct_of(hints[f.name])
            if f.default is not msgspec.NODEFAULT:
                default = f.default
            elif f.default_factory is not msgspec.NODEFAULT:
                default = f.default_factory()
            else:
                default = msgspec.NODEFAULT
            if child is not None:
                sub = (f"[[{f.name}]]" if many else f"[{f.name}]") if header == "(top level)" \
                    else f"[{header.strip('[]')}.{f.name}]"
                children.append((child, sub))
                shown = f"see {sub}"
            else:
                shown = "required" if default is msgspec.NODEFAULT else toml_value(default)
            fields.append(FieldDoc(
                name=f.name, type=_type_text(stmt.annotation), default=shown, doc=comments.get(stmt.lineno, ""),
                checks=[message for targets, _path, message in checks if f.name in targets],
            ))
        field_names = {f.name for f in fields}
        notes = [f"{path}: {message}" for targets, path, message in checks
                 if not field_names.intersection(targets)]
        doc = " ".join((cls.__doc__ or "").split())
        sections.append(SectionDoc(header=header, struct=cls.__name__, doc=doc, fields=fields, notes=notes))
        for child, sub in children:
            visit(child, sub)

    visit(config_module.RuntimeConfig, "(top level)")
    return sections
