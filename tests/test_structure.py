"""The package layout's rules, checked on the source (STYLE.md, Layout and Modules).

* Dependencies point one way, `agents` → `worldmodels` → `diffenvs`, and no module
  outside a package imports that package's private (`_name`) modules, in the
  library code, `scripts/` and `benchmarks/`. The tests are exempt: a package's
  own tests check its internals.
* Every Equinox module class is abstract or final, only abstract methods are
  implemented by subclasses, and a class's fields and `__init__` are defined in
  one class (the Equinox abstract/final pattern).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pathlib
import pkgutil

import equinox as eqx

import diffenvs

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("diffenvs", "worldmodels", "agents")
# What each package may import from the others.
ALLOWED = {"diffenvs": set(), "worldmodels": {"diffenvs"}, "agents": set(PACKAGES)}
# A deliberate exception to "fields in one class": every task has a horizon and a
# solver, declared once (with the horizon's converter and checks) instead of in each
# of the tasks and in every task a user writes.
SHARED_FIELDS = {"AbstractEnv": {"horizon", "solver"}}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _imports(path: pathlib.Path):
    """`(line, module, names)` of every absolute import in `path`, and of every
    `package._private` attribute it reads."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, ()
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module, tuple(a.name for a in node.names)
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in PACKAGES
        ):
            yield node.lineno, f"{node.value.id}.{node.attr}", ()


def _sources():
    for folder in (*PACKAGES, "scripts", "benchmarks"):
        yield from sorted((ROOT / folder).rglob("*.py"))


def _violations(path: pathlib.Path, root: pathlib.Path = ROOT) -> list[str]:
    owner = path.relative_to(root).parts[0]
    found = []
    for line, module, names in _imports(path):
        parts = module.split(".")
        if parts[0] not in PACKAGES or parts[0] == owner:
            continue
        where = f"{path.relative_to(root)}:{line}"
        if owner in ALLOWED and parts[0] not in ALLOWED[owner]:
            found.append(f"{where}: {owner} must not depend on {parts[0]}")
        private = [p for p in (*parts[1:], *names) if _private(p)]
        if private:
            found.append(f"{where}: imports private {module} ({', '.join(private)})")
    return found


def test_no_import_reaches_into_another_package_or_back():
    violations = [v for path in _sources() for v in _violations(path)]
    assert not violations, "\n".join(violations)


def test_the_import_check_catches_a_private_import(tmp_path):
    """The check above can fail: it flags each kind of violation."""
    for folder, source in (
        ("worldmodels", "from diffenvs._errors import error_if\n"),
        ("benchmarks", "import worldmodels._rollout\n"),
        ("agents", "x = diffenvs._registry\n"),
        ("diffenvs", "import worldmodels\n"),
    ):
        path = tmp_path / folder / "module.py"
        path.parent.mkdir(exist_ok=True)
        path.write_text(source)
        assert _violations(path, tmp_path), source


def _module_classes() -> list[type]:
    classes = {}
    for package in PACKAGES:
        root = importlib.import_module(package)
        for info in pkgutil.walk_packages(root.__path__, f"{package}."):
            if info.name.endswith("__main__"):
                continue
            for _, cls in inspect.getmembers(importlib.import_module(info.name)):
                if (
                    inspect.isclass(cls)
                    and issubclass(cls, eqx.Module)
                    and cls.__module__.split(".")[0] in PACKAGES
                ):
                    classes[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return list(classes.values())


def _is_abstract(cls: type) -> bool:
    return bool(
        inspect.isabstract(cls)
        or getattr(cls, "__abstractvars__", ())
        or getattr(cls, "__abstractclassvars__", ())
    )


def _ours(cls: type) -> list[type]:
    """`cls`'s bases (nearest first) that this project defines."""
    return [b for b in cls.__mro__[1:] if b.__module__.split(".")[0] in PACKAGES]


def _fields_declared(cls: type) -> set[str]:
    annotations = cls.__dict__.get("__annotations__", {})
    return {
        name
        for name, annotation in annotations.items()
        if not any(word in str(annotation) for word in ("AbstractVar", "ClassVar"))
    }


def _is_method(value: object) -> bool:
    return inspect.isfunction(value) or isinstance(
        value, property | staticmethod | classmethod
    )


def _writes_init(cls: type) -> bool:
    """Whether `cls` has an `__init__` written in a source file, rather than the
    one that dataclasses generate from the fields."""
    init = cls.__dict__.get("__init__")
    code = getattr(init, "__code__", None)
    return code is not None and not code.co_filename.startswith("<")


def _pattern_violations(cls: type) -> list[str]:
    name = f"{cls.__module__}.{cls.__qualname__}"
    found = []
    for base in _ours(cls):
        if not _is_abstract(base):
            found.append(f"{name} subclasses the final class {base.__name__}")
        for attr in cls.__dict__:
            if attr.startswith(("__", "_abc")) or attr not in base.__dict__:
                continue
            inherited = base.__dict__[attr]
            # Methods only: a class constant (a `ClassVar` default such as a
            # task's state bounds) is configuration, not behaviour.
            if _is_method(inherited) and not getattr(
                inherited, "__isabstractmethod__", False
            ):
                found.append(
                    f"{name}.{attr} overrides the concrete {base.__name__}.{attr}"
                )
    if not _is_abstract(cls):
        declaring = [
            c.__name__
            for c in (cls, *_ours(cls))
            if _fields_declared(c) - SHARED_FIELDS.get(c.__name__, set())
        ]
        if len(declaring) > 1:
            found.append(f"{name} has fields declared in {', '.join(declaring)}")
        with_init = [c.__name__ for c in _ours(cls) if _writes_init(c)]
        if with_init:
            found.append(f"{name} inherits __init__ from {', '.join(with_init)}")
    return found


def test_modules_are_abstract_or_final():
    classes = _module_classes()
    assert diffenvs.HIV in classes and len(classes) > 30
    violations = [v for cls in classes for v in _pattern_violations(cls)]
    assert not violations, "\n".join(violations)


def test_the_pattern_check_catches_each_rule():
    """The check above can fail: one class breaking each rule."""

    class Final(eqx.Module):
        x: int = 0

        def method(self):
            return self.x

    class Sub(Final):
        def method(self):
            return 1

    class Abstract(eqx.Module):
        x: int

        def __init__(self, x):
            self.x = x

    class Concrete(Abstract):
        y: int = 1

    for cls in (Sub, Concrete):
        cls.__module__ = "agents.example"
    Final.__module__ = Abstract.__module__ = "agents.example"
    messages = " ".join(_pattern_violations(Sub) + _pattern_violations(Concrete))
    assert "subclasses the final class Final" in messages
    assert "overrides the concrete Final.method" in messages
    assert "fields declared in" in messages
    assert "inherits __init__" in messages
