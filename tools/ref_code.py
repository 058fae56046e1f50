"""Reference tables read from the source code itself (``ast``, nothing imported): every event name
with the fields its log calls pass, and every actor message with its handler and reply.

An event constant is a module-level string like ``"tenant.step"`` followed by a docstring. Its
fields are the keyword names of each ``<logger>.<level>(CONSTANT, ...)`` call anywhere in
``actors/`` and ``clora/``; ``**{"reward/mean": ...}`` counts its literal keys and
``**{f"train/{k}": ...}`` shows as ``train/*``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import msgspec

__all__ = [
    "EventDoc",
    "MessageDoc",
    "source_root",
    "iter_modules",
    "event_catalog",
    "message_catalog",
]

LOG_METHODS = frozenset({"debug", "info", "warning", "warn", "error", "critical", "exception"})
_SCANNED_PACKAGES = ("actors", "clora")
_SKIPPED = ("clora/observe/",)  # this package repeats some names on purpose


class EventDoc(msgspec.Struct, kw_only=True):
    name: str  # the event string, e.g. "tenant.step"
    constant: str  # e.g. "TENANT_STEP"
    module: str  # where the constant is defined
    doc: str
    levels: set[str] = set()
    fields: dict[str, None] = {}  # ordered set, in order of first use
    emitters: set[str] = set()  # modules that log it


class MessageDoc(msgspec.Struct, kw_only=True):
    name: str
    doc: str
    fields: list[tuple[str, str]]  # (name, annotation)
    handlers: list[tuple[str, str, bool]] = []  # (actor class, reply annotation, concurrent)


def source_root() -> Path:
    """The folder holding the ``actors`` and ``clora`` packages."""
    return Path(__file__).resolve().parents[1]


def iter_modules(root: Path | None = None) -> Iterator[tuple[str, ast.Module]]:
    """(dotted module name, parsed tree) of every module in actors/ and clora/ (observe excluded)."""
    root = root or source_root()
    for package in _SCANNED_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            relative = path.relative_to(root).as_posix()
            if any(relative.startswith(skip) for skip in _SKIPPED):
                continue
            name = relative[: -len(".py")].replace("/", ".").removesuffix(".__init__")
            yield name, ast.parse(path.read_text(), filename=str(path))


def _is_event_name(value: object) -> bool:
    return isinstance(value, str) and "." in value and " " not in value and not value.startswith(".")


def _docstring_after(body: list[ast.stmt], index: int) -> str | None:
    if index + 1 < len(body):
        nxt = body[index + 1]
        if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
            return " ".join(nxt.value.value.split())
    return None


def _module_constants(module: str, tree: ast.Module) -> list[EventDoc]:
    found = []
    for i, stmt in enumerate(tree.body):
        target, value = None, None
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            target, value = stmt.target.id, stmt.value
        elif isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            target, value = stmt.targets[0].id, stmt.value
        if target and isinstance(value, ast.Constant) and _is_event_name(value.value):
            doc = _docstring_after(tree.body, i)
            if doc is not None:
                found.append(EventDoc(name=value.value, constant=target, module=module, doc=doc))
    return found


def _fstring_pattern(node: ast.JoinedStr) -> str:
    return "".join(str(p.value) if isinstance(p, ast.Constant) else "*" for p in node.values)


def _dict_fields(node: ast.Dict, dicts: dict[str, list[str]]) -> list[str]:
    fields = []
    for key, value in zip(node.keys, node.values):
        if isinstance(key, ast.Constant):
            fields.append(str(key.value))
        elif isinstance(key, ast.JoinedStr):
            fields.append(_fstring_pattern(key))
        elif key is None:  # {**other, ...}
            fields += _splat_fields(value, dicts)
    return fields


def _splat_fields(value: ast.expr, dicts: dict[str, list[str]]) -> list[str]:
    """Field names of ``**value`` in a log call."""
    if isinstance(value, ast.Dict):
        return _dict_fields(value, dicts)
    if isinstance(value, ast.DictComp) and isinstance(value.key, ast.JoinedStr):
        return [_fstring_pattern(value.key)]
    if isinstance(value, ast.Name) and value.id in dicts:
        return list(dicts[value.id])
    return [f"**{ast.unparse(value)}"]


def _local_dicts(scope: ast.AST) -> dict[str, list[str]]:
    """Field names of the dicts a function builds (``d = {...}``, ``d = {f"x/{k}": ...}``,
    ``d.update({...})``, ``d["key"] = ...``), in source order: what ``**d`` may hold."""
    dicts: dict[str, list[str]] = {}
    nodes = sorted((n for n in ast.walk(scope) if hasattr(n, "lineno")), key=lambda n: (n.lineno, n.col_offset))
    for node in nodes:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name) and isinstance(node.value, (ast.Dict, ast.DictComp)):
                dicts[target.id] = _splat_fields(node.value, dicts)
            elif isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name) \
                    and target.value.id in dicts and isinstance(target.slice, ast.Constant):
                dicts[target.value.id].append(str(target.slice.value))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "update" \
                and isinstance(node.func.value, ast.Name) and node.func.value.id in dicts and node.args:
            dicts[node.func.value.id] += _splat_fields(node.args[0], dicts)
    return dicts


def _call_fields(call: ast.Call, dicts: dict[str, list[str]] | None = None) -> list[str]:
    fields = []
    for kw in call.keywords:
        if kw.arg is not None:
            fields.append(kw.arg)
        elif isinstance(kw.value, ast.Dict):
            fields += _dict_fields(kw.value, dicts or {})
        else:
            fields += _splat_fields(kw.value, dicts or {})
    return fields


def _name_of(node: ast.expr) -> str | None:
    return node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None


def _is_log_call(node: ast.Call) -> bool:
    return isinstance(node.func, ast.Attribute) and node.func.attr in LOG_METHODS and bool(node.args)


def _forwarding_functions(tree: ast.Module) -> dict[str, list[tuple[int, str, list[str]]]]:
    """Functions that log an event name they receive as a parameter (``def _step(self, event, ...)``):
    name -> (positional index of that parameter at a call site, level, fields)."""
    found: dict[str, list[tuple[int, str, list[str]]]] = {}
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        params = [a.arg for a in fn.args.args]
        offset = 1 if params and params[0] in ("self", "cls") else 0
        dicts = _local_dicts(fn)
        for node in ast.walk(fn):
            if isinstance(node, ast.Call) and _is_log_call(node) and isinstance(node.args[0], ast.Name) \
                    and node.args[0].id in params[offset:]:
                index = params.index(node.args[0].id) - offset
                found.setdefault(fn.name, []).append((index, node.func.attr, _call_fields(node, dicts)))
    return found


def event_catalog(root: Path | None = None) -> list[EventDoc]:
    """Every documented event constant, with the levels and fields of the calls that log it."""
    modules = list(iter_modules(root))
    docs: list[EventDoc] = []
    local: dict[str, dict[str, EventDoc]] = {}
    for module, tree in modules:
        found = _module_constants(module, tree)
        docs += found
        local[module] = {d.constant: d for d in found}
    by_constant: dict[str, list[EventDoc]] = {}
    for d in docs:
        by_constant.setdefault(d.constant, []).append(d)
    def record(module: str, constant: str, level: str, fields: list[str]) -> None:
        own = local[module].get(constant)
        for doc in [own] if own is not None else by_constant.get(constant, []):
            doc.levels.add("warning" if level == "warn" else level)
            doc.emitters.add(module)
            for field in fields:
                doc.fields.setdefault(field, None)

    for module, tree in modules:
        forwarded = _forwarding_functions(tree)
        scope_dicts: dict[int, dict[str, list[str]]] = {}  # call id -> dicts of its innermost function
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                dicts = _local_dicts(fn)
                for node in ast.walk(fn):
                    if isinstance(node, ast.Call):
                        scope_dicts[id(node)] = dicts
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            if _is_log_call(node):
                constant = _name_of(node.args[0])
                if constant is not None:
                    record(module, constant, node.func.attr, _call_fields(node, scope_dicts.get(id(node))))
            callee = _name_of(node.func)
            for index, level, fields in forwarded.get(callee or "", []):
                if index < len(node.args) and (constant := _name_of(node.args[index])) is not None:
                    record(module, constant, level, fields)
    return sorted(docs, key=lambda d: d.name)


def _handler_decorator(node: ast.AsyncFunctionDef) -> bool | None:
    """None if not a @handler; else whether it is concurrent."""
    for dec in node.decorator_list:
        if isinstance(dec, ast.Name) and dec.id == "handler":
            return False
        if isinstance(dec, ast.Call) and isinstance(dec.func, ast.Name) and dec.func.id == "handler":
            return any(kw.arg == "concurrent" and isinstance(kw.value, ast.Constant) and kw.value.value
                       for kw in dec.keywords)
    return None


def _annotation_names(node: ast.expr | None) -> list[str]:
    if node is None:
        return []
    if isinstance(node, ast.BinOp):  # A | B
        return _annotation_names(node.left) + _annotation_names(node.right)
    if isinstance(node, ast.Name):
        return [node.id]
    if isinstance(node, ast.Attribute):
        return [node.attr]
    return []


def _message_doc(node: ast.ClassDef) -> MessageDoc:
    fields = [(s.target.id, ast.unparse(s.annotation)) for s in node.body
              if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)]
    return MessageDoc(name=node.name, doc=" ".join((ast.get_docstring(node) or "").split()), fields=fields)


def message_catalog(root: Path | None = None) -> list[MessageDoc]:
    """The Structs of clora/messages.py, and message types defined elsewhere that an actor handles,
    with the actors that handle them (from their @handler methods)."""
    root = root or source_root()
    tree = ast.parse((root / "clora" / "messages.py").read_text())
    messages: dict[str, MessageDoc] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            messages[node.name] = _message_doc(node)
    modules = list(iter_modules(root))
    structs = {  # message types defined next to their actor (e.g. RunExperiment in clora/tenant/actor.py)
        node.name: node for _module, module_tree in modules for node in module_tree.body
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_") and node.name not in messages
    }
    for _module, module_tree in modules:
        for cls in (n for n in ast.walk(module_tree) if isinstance(n, ast.ClassDef)):
            for fn in cls.body:
                if not isinstance(fn, ast.AsyncFunctionDef):
                    continue
                concurrent = _handler_decorator(fn)
                if concurrent is None or len(fn.args.args) < 2:
                    continue
                reply = ast.unparse(fn.returns) if fn.returns is not None else "None"
                for name in _annotation_names(fn.args.args[1].annotation):
                    if name not in messages and name in structs:
                        messages[name] = _message_doc(structs[name])
                    if name in messages:
                        messages[name].handlers.append((cls.name, reply, concurrent))
    return list(messages.values())
