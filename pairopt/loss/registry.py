"""The loss registry: a dict, a decorator, get / list / build, and where plugins come from.

    @register_loss("my_loss")
    class MyLoss(PairLoss):
        summary = "one line for `pairopt losses`"
        requires_reference = True
        class Config(LossConfig):
            beta: float = Field(0.1, gt=0, description="...")
        config: Config
        def compute(self, policy, reference):  # PairLogps (N,) each
            ...
            return LossOutput(losses_N, metrics)

Listwise losses (`pairopt.loss.listwise.ListLoss`, kind "list") register the same way, in the
same registry; the kind is a class attribute the trainer reads.

Plugins are found three ways, all ending in `register_loss`: the entry-point group
`pairopt.losses` (the built-ins in the top-level `losses/` package use it exactly like a
third-party package does; it is read lazily, on the first registry lookup), a class registered
in the user's own script, and `load_loss_module` (the CLI's `--loss-module`) for a module name
or a `.py` path. A user's own `losses.py` or `losses/` that would be imported in place of the
built-ins (it comes first on sys.path) is refused, naming the file.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pydantic
from pydantic import BaseModel

from pairopt.errors import PairoptError
from pairopt.loss.base import LOSS_KINDS, Loss, LossConfig

ENTRY_POINT_GROUP = "pairopt.losses"
BUILTIN_PACKAGE = "losses"  # the top-level package beside pairopt/ that holds the built-ins

_REGISTRY: dict[str, type[Loss]] = {}
_entry_points_loaded = False

L = TypeVar("L", bound=type[Loss])


def _load_entry_points() -> None:
    """Import every module named in the `pairopt.losses` entry-point group, once.

    Called before the first lookup *and* before the first registration, so a user who registers
    a name the built-ins already own gets the duplicate error at their own decorator.
    """
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True  # set first: the plugins' own decorators come back here
    seen: set[str] = set()
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry_point.value in seen:  # the same distribution found twice on sys.path
            continue
        seen.add(entry_point.value)
        if entry_point.value == BUILTIN_PACKAGE:
            _check_builtins_not_shadowed()
        try:
            entry_point.load()
        except PairoptError:
            raise
        except Exception as err:
            # One broken third-party plugin must not take every loss down; say so loudly.
            warnings.warn(
                f"could not load loss plugins from entry point {entry_point.name!r} = "
                f"{entry_point.value!r} (group {ENTRY_POINT_GROUP!r}): {type(err).__name__}: {err}",
                stacklevel=2,
            )


def _check_builtins_not_shadowed() -> None:
    """Refuse a `losses` module other than the package shipped beside pairopt/.

    `python -m pairopt` puts the working directory first on sys.path, so a project's own
    `losses.py` (or `losses/` package) would be imported instead of the built-ins and every
    built-in loss would silently be missing or replaced.
    """
    shipped = Path(__file__).resolve().parents[2] / BUILTIN_PACKAGE / "__init__.py"
    module = sys.modules.get(BUILTIN_PACKAGE)
    if module is not None:
        origin = getattr(module, "__file__", None)
    else:
        spec = importlib.util.find_spec(BUILTIN_PACKAGE)
        origin = spec.origin if spec is not None else None
    if origin is None or Path(origin).resolve() == shipped:
        return  # nothing importable by that name, or a namespace folder (never wins)
    raise PairoptError(
        f"{origin} is imported as the module 'losses' in place of pairopt's built-in losses "
        f"({shipped.parent}), because its folder comes first on sys.path. Rename it (e.g. to "
        "my_losses.py and load it with --loss-module my_losses.py), or run pairopt from "
        "another directory."
    )


def _defining_file(cls: type) -> str | None:
    """The file that defines `cls`, also while its module is still executing outside sys.modules."""
    try:
        return inspect.getsourcefile(cls)
    except TypeError:  # module not in sys.modules (spec_from_file_location + exec_module)
        pass
    for value in vars(cls).values():
        code = getattr(getattr(value, "__func__", value), "__code__", None)
        if code is not None:
            return str(code.co_filename)
    return None


def _same_definition(a: type, b: type) -> bool:
    """True when `b` is `a` defined again: a reload, or a script imported both as __main__ and by path."""
    if a.__qualname__ != b.__qualname__:
        return False
    file_a, file_b = _defining_file(a), _defining_file(b)
    if file_a is None or file_b is None or not (os.path.exists(file_a) and os.path.exists(file_b)):
        return False
    return os.path.samefile(file_a, file_b)


def register_loss(name: str) -> Callable[[L], L]:
    """Class decorator: register a `PairLoss` or `ListLoss` subclass under `name` (an error if
    the name is taken)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(
            f"a loss name must be a Python identifier (letters, digits, _), got {name!r}"
        )

    def decorator(cls: L) -> L:
        if not (isinstance(cls, type) and issubclass(cls, Loss) and cls.kind in LOSS_KINDS):
            raise TypeError(
                f"@register_loss({name!r}) decorates PairLoss subclasses (or ListLoss "
                f"subclasses, the listwise kind), got {cls!r}"
            )
        if not (isinstance(cls.Config, type) and issubclass(cls.Config, BaseModel)):
            raise TypeError(f"{cls.__name__}.Config must be a pydantic model (subclass LossConfig)")
        _load_entry_points()
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not cls and not _same_definition(existing, cls):
            raise PairoptError(
                f"loss name {name!r} is already registered by {existing.__module__}.{existing.__qualname__}; "
                f"{cls.__module__}.{cls.__qualname__} cannot take it too. Register it under another name."
            )
        cls.name = name
        if not cls.summary:
            cls.summary = inspect.cleandoc(cls.__doc__ or "").partition("\n")[0]
        _REGISTRY[name] = cls
        return cls

    return decorator


def available_losses() -> list[str]:
    """Names of every registered loss, sorted."""
    _load_entry_points()
    return sorted(_REGISTRY)


def get_loss_class(name: str) -> type[Loss]:
    """The registered class: read `kind`, `requires_reference`, `Config`, `summary` without
    building."""
    _load_entry_points()
    try:
        return _REGISTRY[name]
    except KeyError:
        if not _REGISTRY:
            raise PairoptError(
                f"unknown loss {name!r}: no losses are registered at all. The built-in losses are "
                f"found through the {ENTRY_POINT_GROUP!r} entry points of the installed pairopt "
                "distribution: install it (pip install -e . in a checkout) rather than only putting "
                "it on PYTHONPATH."
            ) from None
        raise PairoptError(
            f"unknown loss {name!r}. Registered losses: {', '.join(sorted(_REGISTRY))}. "
            "A loss defined in your own module is found with --loss-module MODULE_OR_FILE.py "
            "(or by importing that module before building the loss)."
        ) from None


def build_loss(name: str, /, **params: Any) -> Loss:
    """Validate `params` with the plugin's `Config` and build the loss.

    Bad parameters raise `PairoptError` naming the field, the value given, and what is allowed.
    """
    cls = get_loss_class(name)
    return cls(validate_params(cls, params))


def validate_params(cls: type[Loss], params: dict[str, Any]) -> LossConfig:
    """`cls.Config(**params)`, with pydantic's errors turned into one readable `PairoptError`."""
    try:
        return cls.Config(**params)
    except pydantic.ValidationError as err:
        problems = [_describe_error(cls, error) for error in err.errors()]
        raise PairoptError(
            f"invalid parameters for loss {cls.name!r}: " + "; ".join(problems)
        ) from None


def _describe_error(cls: type[Loss], error: Any) -> str:
    loc = ".".join(str(part) for part in error["loc"]) or "(config)"
    fields = cls.Config.ordered_fields()
    if error["type"] == "extra_forbidden":
        valid = ", ".join(fields) or "none"
        return f"unknown parameter {loc!r} (parameters of {cls.name!r}: {valid})"
    if error["type"] == "missing":
        return f"missing required parameter {loc!r}"
    top = fields.get(str(error["loc"][0])) if error["loc"] else None
    hint = (
        f" ({loc}: {top.description})"
        if top is not None and top.description and len(error["loc"]) == 1
        else ""
    )
    return f"{loc}={error.get('input')!r} is invalid: {error['msg']}{hint}"


# ---------------------------------------------------------------------------------------------
# --loss-module
# ---------------------------------------------------------------------------------------------


def load_loss_module(spec: str) -> list[str]:
    """Import a module (dotted name, or a path to a `.py` file) that registers losses.

    Returns the names it registered. Anything that stops the import becomes a `PairoptError`
    naming the module and where it failed, so the CLI reports it in one paragraph.
    """
    _load_entry_points()
    before = set(_REGISTRY)
    is_path = (
        spec.endswith(".py") or os.sep in spec or (os.altsep is not None and os.altsep in spec)
    )
    try:
        if is_path:
            _import_path(Path(spec))
        else:
            # A console script does not put the working directory on sys.path; `python -m` does.
            # `--loss-module my_losses` should find ./my_losses.py either way.
            added = os.getcwd() not in sys.path
            if added:
                sys.path.insert(0, os.getcwd())
            try:
                importlib.import_module(spec)
            finally:
                if added:
                    sys.path.remove(os.getcwd())
    except PairoptError:
        raise
    except ModuleNotFoundError as err:
        raise PairoptError(
            f"cannot import loss module {spec!r}: {err}. Give an importable module name "
            "(on PYTHONPATH or in the working directory) or a path to a .py file."
        ) from err
    except Exception as err:
        raise PairoptError(f"loss module {spec!r} failed to import: {_where(err)}") from err
    return sorted(set(_REGISTRY) - before)


def _import_path(path: Path) -> None:
    if not path.is_file():
        raise PairoptError(f"loss module file {str(path)!r} does not exist (or is not a file).")
    resolved = path.resolve()
    for module in list(sys.modules.values()):  # already imported (e.g. the running script itself)
        file = getattr(module, "__file__", None)
        if file and Path(file).resolve() == resolved and module.__name__ != "__main__":
            return
    module_name = f"pairopt_loss_module_{resolved.stem}_{abs(hash(str(resolved))):x}"
    spec = importlib.util.spec_from_file_location(module_name, resolved)
    if spec is None or spec.loader is None:
        raise PairoptError(f"cannot import {str(path)!r} as a Python module.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise


def _where(err: BaseException) -> str:
    frames = traceback.extract_tb(err.__traceback__)
    location = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(err).__name__}: {err}{location}"
