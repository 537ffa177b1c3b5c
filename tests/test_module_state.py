"""The project's rule: no module-level mutable registries; long-lived state is created in
lifespan startup (on the :class:`~roomcast.runtime.Runtime`), so two apps in one process
never share it and nothing outlives the lifespan.

A static guard over the package's source: a module-level ``threading.local`` or weak
collection is a registry whatever is done with it; a module-level dict, list or set is one
only if the module changes it (a constant table such as ``hardening.COMPRESSION`` is not).
"""

from __future__ import annotations

import ast
from pathlib import Path

import roomcast

#: calls whose result kept at module level is a registry of live objects
REGISTRY_TYPES = frozenset({"local", "WeakSet", "WeakValueDictionary", "WeakKeyDictionary"})
#: calls that make a container, a registry once the module changes it
CONTAINER_TYPES = frozenset({"dict", "list", "set", "defaultdict", "OrderedDict", "deque"})
CONTAINER_LITERALS = (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp)
#: methods that change a container in place
MUTATORS = frozenset(
    {
        "add",
        "append",
        "appendleft",
        "clear",
        "discard",
        "extend",
        "insert",
        "move_to_end",
        "pop",
        "popitem",
        "popleft",
        "remove",
        "setdefault",
        "update",
    }
)


def _called(node: ast.expr) -> str | None:
    """The name a call's function is spelled with (``threading.local`` -> ``local``)."""
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else None


def _module_level_bindings(tree: ast.Module) -> dict[str, tuple[ast.expr, int]]:
    """Each name bound at the module's top level, with its value and line."""
    bindings = {}
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets = [node.target]
        else:
            continue
        for target in targets:
            if isinstance(target, ast.Name):
                assert node.value is not None
                bindings[target.id] = (node.value, node.lineno)
    return bindings


def _changed_in_place(tree: ast.Module) -> set[str]:
    """Names the module changes in place: ``name[k] = v``, ``del name[k]``, ``name += x``,
    ``name.append(x)`` and the like."""
    changed = set()
    for node in ast.walk(tree):
        targets: list[ast.expr] = []
        if isinstance(node, (ast.Assign, ast.Delete)):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        for target in targets:
            if isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name):
                changed.add(target.value.id)
            elif isinstance(node, ast.AugAssign) and isinstance(target, ast.Name):
                changed.add(target.id)
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in MUTATORS
            and isinstance(node.func.value, ast.Name)
        ):
            changed.add(node.func.value.id)
    return changed


def module_registries(source: str) -> list[str]:
    """The module-level mutable registries in one module's source: ``name (line n)``."""
    tree = ast.parse(source)
    registry_classes = {
        node.name
        for node in tree.body
        if isinstance(node, ast.ClassDef)
        and any(_called(base) in REGISTRY_TYPES for base in node.bases)
    }
    changed = _changed_in_place(tree)
    found = []
    for name, (value, line) in _module_level_bindings(tree).items():
        called = _called(value.func) if isinstance(value, ast.Call) else None
        is_registry = called in REGISTRY_TYPES or called in registry_classes
        is_container = isinstance(value, CONTAINER_LITERALS) or called in CONTAINER_TYPES
        if is_registry or (is_container and name in changed):
            found.append(f"{name} (line {line})")
    return found


def test_the_guard_finds_a_registry() -> None:
    """What the guard is for: a per-thread registry (hardening's idle deflaters were one),
    a weak set, a cache filled at run time; not a constant table."""
    source = """
import threading, weakref
class Registry(threading.local):
    pass
_per_thread = Registry()
_live = weakref.WeakSet()
_cache: dict[str, int] = {}
TABLE = {"a": 1}
def remember(key: str) -> int:
    _cache[key] = TABLE[key]
    return TABLE[key]
"""
    assert module_registries(source) == [
        "_per_thread (line 5)",
        "_live (line 6)",
        "_cache (line 7)",
    ]


def test_no_module_level_mutable_registries() -> None:
    package = Path(roomcast.__file__).parent
    found = {
        str(path.relative_to(package)): registries
        for path in sorted(package.rglob("*.py"))
        if (registries := module_registries(path.read_text(encoding="utf-8")))
    }
    assert found == {}, "long-lived state belongs on the Runtime, created in lifespan startup"
