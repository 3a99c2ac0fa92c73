"""Content identity: an unambiguous encoding of values and code, and the digests built from it.

A task's key is the digest of its *components*: the normalised code of its function, the code
of the helpers and the values of the globals it uses (followed recursively), the versions of the
modules it touches, its arguments, its upstream keys, the content of its input files and its
``version``. Names and resources are not part of it.

Nothing here pickles: pickles of dicts and plain string joins collide or drift. Every value is
written as a type tag, a length and a payload, so two different values never share an encoding.
A dict's entries are encoded in order (a task can see the order of a dict it is given); the key's
own components are encoded sorted (:func:`key_digest`), so a stored JSON copy gives the same key.

>>> digest({"b": 1, "a": (1.5, "x")}) == digest({"a": (1.5, "x"), "b": 1})
False
>>> key_digest({"b": 1, "a": [2]}) == key_digest({"a": [2], "b": 1})
True

What "the user's own code" is: a module whose file is not in the standard library, in
site-packages (or another installed prefix) or in nbpipe: a notebook, the script, a ``mylib.py``
beside them, a local package. Its functions, classes and constants count by content wherever a task
reaches them (``mylib.f``, ``from mylib import f``, ``import pkg.sub as s``, also inside the task's
body). Installed libraries count by their distribution's version.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import datetime as _dt
import enum
import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import sys
import sysconfig
import textwrap
import types
import weakref
from collections.abc import Callable, Iterable, Iterator
from pathlib import PurePath
from typing import Any

from .errors import UnhashableValue

__all__ = ["IDENTITY_VERSION", "CodeIdentity", "DictShape", "SealedDict", "Unencodable",
           "cell_identity", "code_identity", "digest", "encode", "is_immutable", "is_stand_in",
           "is_user_module", "key_digest", "module_version", "register_stand_ins"]

#: The version of the rules that make a task's key. Keys made under another version never match:
#: a store's results are kept, and its tasks re-run once, saying why (see ``docs/concepts.md``).
IDENTITY_VERSION = 2


class Unencodable(Exception):
    """Internal: raised with the path inside the value that could not be encoded."""

    def __init__(self, typename: str, path: str = ""):
        super().__init__(typename, path)
        self.typename = typename
        self.path = path


def _hasher(data: bytes = b"") -> Any:
    return hashlib.blake2b(data, digest_size=16)


def digest(value: Any) -> str:
    """The hex digest of ``value``'s canonical encoding (32 hex characters)."""
    out: list[bytes] = []
    _encode(value, out)
    if any(type(chunk) is memoryview for chunk in out):  # a numpy array's data: no copy
        h = _hasher()
        for chunk in out:
            h.update(chunk)
        return h.hexdigest()
    return _hasher(b"".join(out)).hexdigest()


def _frame(tag: bytes, payload: bytes) -> bytes:
    return tag + len(payload).to_bytes(8, "little") + payload


def encode(value: Any) -> Iterator[bytes]:
    """Yield the canonical encoding of ``value``: tag, length, payload, recursively.

    Raises :class:`Unencodable` (with the path of the offending part) for values that have no
    deterministic encoding, such as open files, locks or arbitrary objects.
    """
    out: list[bytes] = []
    _encode(value, out)
    return iter(out)


def _bytes(value: Any) -> bytes:
    out: list[bytes] = []
    _encode(value, out)
    return b"".join(out)


def _encode(value: Any, out: list[bytes]) -> None:
    """Append ``value``'s encoding to ``out``. The common exact types come first; the rest
    keeps the order that matters (bool before int, enums and named tuples before their bases)."""
    kind = type(value)
    if kind is str:
        out.append(_frame(b"S", value.encode("utf-8", "surrogatepass")))
    elif kind is int:
        out.append(_frame(b"I", str(value).encode()))
    elif kind is SealedDict:
        out.append(value.encoding())
    elif kind is dict:
        _encode_dict(value, out)
    elif kind is list or kind is tuple:
        out.append(b"L" if kind is list else b"T")
        _encode_items(value, out)
    elif value is None:
        out.append(b"N")
    elif kind is bool:
        out.append(b"B1" if value else b"B0")
    elif kind is float:
        out.append(_frame(b"F", value.hex().encode()))
    else:
        _encode_other(value, out)


def _encode_other(value: Any, out: list[bytes]) -> None:
    if isinstance(value, enum.Enum):
        out.append(_frame(b"M", _qualname(type(value)).encode()))
        _encode(value.value, out)
    elif type(value) is complex:
        out.append(_frame(b"X", f"{value.real.hex()},{value.imag.hex()}".encode()))
    elif isinstance(value, (bytes, bytearray, memoryview)):
        out.append(_frame(b"Y", bytes(value)))
    elif isinstance(value, PurePath):
        out.append(_frame(b"P", os.fspath(value).encode("utf-8", "surrogateescape")))
    elif hasattr(value, "__nbpipe_token__") and not isinstance(value, type):
        out.append(_frame(b"K", _qualname(type(value)).encode()))
        _encode(value.__nbpipe_token__(), out)
    elif is_dask_collection(value):  # a dask.delayed, a dask.array: by Dask's own token
        from dask.base import tokenize

        out.append(_frame(b"Q", tokenize(value).encode()))
    elif isinstance(value, tuple) and hasattr(value, "_fields"):
        out.append(_frame(b"U", _qualname(type(value)).encode()))
        _encode_class_code(type(value), out)
        _encode_items(value, out)
    elif isinstance(value, dict):
        _encode_dict(value, out)
    elif isinstance(value, (set, frozenset)):
        try:
            items = sorted(_bytes(v) for v in value)  # a set has no order a task can rely on
        except Unencodable as exc:
            exc.path = "{...}" + exc.path
            raise
        out.append(_frame(b"E", len(items).to_bytes(8, "little")))
        out.extend(items)
    elif isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        out.append(_frame(b"t", f"{type(value).__name__}:{value.isoformat()}".encode()))
    elif isinstance(value, _dt.timedelta):
        out.append(_frame(b"d", repr(value.total_seconds()).encode()))
    elif _is_numpy(value):
        _encode_numpy(value, out)
    elif isinstance(value, (types.FunctionType, types.BuiltinFunctionType, type)):
        out.append(_frame(b"G", code_identity(value).digest.encode()))
    elif isinstance(value, types.MethodType):  # MODEL.predict: the object and its method's code
        out.append(b"m")
        _encode(value.__self__, out)
        _encode(value.__func__, out)
    elif isinstance(value, functools.partial):  # what it wraps and the arguments it binds
        out.append(b"p")
        _encode(value.func, out)
        _encode(tuple(value.args), out)
        _encode(dict(value.keywords), out)
    elif isinstance(value, types.ModuleType):
        if _is_user_module(value):
            out.append(_frame(b"o", f"{value.__name__}:{_module_source_digest(value)}".encode()))
        else:
            out.append(_frame(b"O", f"{value.__name__}=={module_version(value.__name__)}".encode()))
    elif hasattr(value, "__nbpipe_key__"):  # a TaskRef: identified by its upstream key
        out.append(_frame(b"R", value.__nbpipe_key__().encode()))
    elif callable(value) and hasattr(value, "__wrapped__"):  # lru_cache, cache, wraps-made objects
        out.append(b"W")
        _encode(value.__wrapped__, out)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        out.append(_frame(b"C", _qualname(type(value)).encode()))
        _encode_class_code(type(value), out)
        _encode_dict({f.name: getattr(value, f.name) for f in dataclasses.fields(value)}, out)
    elif _is_user_code(type(value)) and not isinstance(value, type):
        _encode_instance(value, out)
    else:
        raise Unencodable(_qualname(type(value)))


def _encode_class_code(cls: type, out: list[bytes]) -> None:
    """An object of the user's own class counts with its class's code (methods, properties, user
    base classes): editing ``Model.predict`` changes every key that holds a ``Model``."""
    if _is_user_code(cls):
        out.append(_frame(b"k", code_identity(cls).digest.encode()))


_encoding_now: set[int] = set()  # objects being encoded (a cycle would recurse forever)


def _encode_instance(value: Any, out: list[bytes]) -> None:
    """An instance of a user class: its class's code and its attributes (by name)."""
    if id(value) in _encoding_now:
        raise Unencodable(f"{_qualname(type(value))} (it contains itself)")
    attrs: dict[str, Any] = {}
    for cls in type(value).__mro__:
        slots = getattr(cls, "__slots__", ())
        for slot in (slots,) if isinstance(slots, str) else slots:
            if slot not in ("__dict__", "__weakref__") and hasattr(value, slot):
                attrs[slot] = getattr(value, slot)
    attrs.update(getattr(value, "__dict__", {}))
    out.append(_frame(b"c", _qualname(type(value)).encode()))
    _encode_class_code(type(value), out)
    _encoding_now.add(id(value))
    try:
        _encode_sorted_dict(attrs, out)  # attributes have no order a method can see
    finally:
        _encoding_now.discard(id(value))


def _encode_dict(value: dict[Any, Any], out: list[bytes]) -> None:
    """A dict in its own order: ``{"a": 1, "b": 2}`` and ``{"b": 2, "a": 1}`` differ, as
    ``",".join(d)`` in a task would."""
    out.append(_frame(b"D", len(value).to_bytes(8, "little")))
    for k, v in value.items():
        try:
            _encode(k, out)
            _encode(v, out)
        except Unencodable as exc:
            exc.path = f"[{k!r}]" + exc.path
            raise


def _encode_sorted_dict(value: dict[Any, Any], out: list[bytes], canonical: bool = False) -> None:
    """A dict whose order means nothing (a key's components, an object's attributes); with
    ``canonical`` the dicts inside it are sorted too."""
    pairs = []
    for k, v in value.items():
        try:
            pairs.append((_bytes(k), _canonical_bytes(v) if canonical else _bytes(v)))
        except Unencodable as exc:
            exc.path = f"[{k!r}]" + exc.path
            raise
    pairs.sort()
    out.append(_frame(b"Z", len(pairs).to_bytes(8, "little")))
    for k, v in pairs:
        out.append(k)
        out.append(v)


def _canonical_bytes(value: Any) -> bytes:
    out: list[bytes] = []
    _encode_canonical(value, out)
    return b"".join(out)


def _encode_canonical(value: Any, out: list[bytes]) -> None:
    """Like :func:`_encode`, with every dict (at any depth of lists and dicts) sorted."""
    if type(value) is SealedDict:
        out.append(value.encoding())
    elif type(value) is dict:
        _encode_sorted_dict(value, out, canonical=True)
    elif type(value) is list or type(value) is tuple:
        out.append(b"L" if type(value) is list else b"T")
        out.append(len(value).to_bytes(8, "little"))
        for item in value:
            _encode_canonical(item, out)
    else:
        _encode(value, out)


def key_digest(components: dict[str, Any]) -> str:
    """The key made of a task's components: their digest with every dict sorted, so the JSON copy
    in the store (whatever its key order) gives the key back."""
    out: list[bytes] = []
    _encode_canonical(components, out)
    return _hasher(b"".join(out)).hexdigest()


def _encode_items(items: Any, out: list[bytes]) -> None:
    out.append(len(items).to_bytes(8, "little"))
    i = 0
    try:
        for i, item in enumerate(items):  # noqa: B007 - i names the failing item
            _encode(item, out)
    except Unencodable as exc:
        exc.path = f"[{i}]" + exc.path
        raise


class DictShape:
    """Dicts that share most of their entries, such as the components of one function's tasks.

    ``shape.digest(extra)`` equals ``key_digest({**shape.fixed, **extra})`` for the extra keys
    named when the shape was made, but encodes the fixed entries only once.

    >>> shape = DictShape({"code": "c1", "kind": "python"}, ["args"])
    >>> shape.digest({"args": [1]}) == key_digest({"code": "c1", "kind": "python", "args": [1]})
    True
    """

    __slots__ = ("_count", "_parts", "fixed", "fixed_digest")

    def __init__(self, fixed: dict[str, Any], extra_keys: Iterable[str]):
        self.fixed = fixed
        self.fixed_digest = key_digest(fixed)
        entries: dict[bytes, tuple[bool, Any]] = {
            _bytes(k): (True, _bytes(k) + _canonical_bytes(v)) for k, v in fixed.items()}
        for name in extra_keys:
            entries[_bytes(name)] = (False, name)
        self._count = _frame(b"Z", len(entries).to_bytes(8, "little"))
        parts: list[Any] = []  # bytes for runs of fixed entries, (key bytes, name) for extras
        for key_bytes in sorted(entries):  # a dict's entries are sorted by their encoded keys
            is_fixed, what = entries[key_bytes]
            if not is_fixed:
                parts.append((key_bytes, what))
            elif parts and type(parts[-1]) is bytes:
                parts[-1] += what
            else:
                parts.append(what)
        self._parts = parts

    def digest(self, extra: dict[str, Any]) -> str:
        """The digest of the fixed entries together with ``extra`` (exactly its named keys)."""
        out = [self._count]
        for part in self._parts:
            if type(part) is bytes:
                out.append(part)
            else:
                out.append(part[0])
                _encode_canonical(extra[part[1]], out)
        return _hasher(b"".join(out)).hexdigest()


class SealedDict(dict):  # type: ignore[type-arg]
    """A dict that is never changed after it is built, so its encoding is computed once.

    The parts of a function's code identity are sealed: thousands of tasks of one function share
    them, and their keys encode them without walking them again.
    """

    __slots__ = ("_encoding",)

    def encoding(self) -> bytes:
        """The canonical encoding: sorted, as :func:`key_digest` encodes a plain dict."""
        try:
            return self._encoding
        except AttributeError:
            out: list[bytes] = []
            _encode_sorted_dict(self, out, canonical=True)
            self._encoding: bytes = b"".join(out)
            return self._encoding


def is_dask_collection(value: Any) -> bool:
    """Whether ``value`` is a Dask collection (without building its graph, which
    ``dask.is_dask_collection`` may do)."""
    return not isinstance(value, type) and callable(getattr(type(value), "__dask_graph__", None))


def _is_numpy(value: Any) -> bool:
    return type(value).__module__ == "numpy" and hasattr(value, "dtype")


def _encode_numpy(value: Any, out: list[bytes]) -> None:
    import numpy as np

    if isinstance(value, np.generic):
        out.append(_frame(b"n", value.dtype.str.encode()))
        _encode(value.item(), out)
        return
    if value.dtype.hasobject:
        raise Unencodable("numpy.ndarray of dtype object")
    array = np.ascontiguousarray(value)
    out.append(_frame(b"A", f"{array.dtype.str}:{array.shape}".encode()))
    data = memoryview(array.reshape(-1).view(np.uint8))  # hashed in place, not copied
    out.append(b"a" + data.nbytes.to_bytes(8, "little"))
    out.append(data)


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


# --------------------------------------------------------------------------------------------
# Modules and their versions


@functools.cache
def _package_distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


@functools.cache
def module_version(name: str) -> str:
    """The version of the distribution that provides top-level module ``name``.

    Standard-library modules report the Python version; unknown ones ``"unknown"``.
    """
    top = name.partition(".")[0]
    if top in sys.stdlib_module_names or top == "builtins":
        return f"python-{sys.version_info.major}.{sys.version_info.minor}"
    for dist in _package_distributions().get(top, []):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:  # pragma: no cover - broken install
            continue
    mod = sys.modules.get(top)
    return str(getattr(mod, "__version__", "unknown"))


@functools.cache
def _library_roots() -> tuple[str, ...]:
    import site

    paths = sysconfig.get_paths()
    roots = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    roots.add(os.path.dirname(os.__file__))
    roots.add(os.path.dirname(__file__))  # nbpipe itself
    with contextlib.suppress(Exception):  # site's functions are missing in some embedded Pythons
        roots.update(site.getsitepackages())
        roots.add(site.getusersitepackages())
    return tuple(sorted(os.path.join(os.path.realpath(r), "") for r in roots))


def _is_user_code(obj: Any) -> bool:
    """True for functions and classes of the user's own scripts and notebooks.

    Library code (standard library, site-packages, nbpipe itself) enters a key by its module's
    version instead of its code.
    """
    modname = getattr(obj, "__module__", None) or ""
    if modname.partition(".")[0] in ("nbpipe", "builtins") or modname in sys.builtin_module_names:
        return False
    module = sys.modules.get(modname)
    filename = getattr(module, "__file__", None)
    if module is None or not filename:
        return True  # __main__ of a notebook or an interactive session
    return not _is_library_file(filename)


def is_user_module(module: types.ModuleType) -> bool:
    """A module of the user's own code (see the module docstring): not installed, not nbpipe.

    >>> import json
    >>> is_user_module(json)
    False
    """
    filename = getattr(module, "__file__", None)
    if not filename or module.__name__.partition(".")[0] in ("nbpipe", "builtins"):
        return False
    return not _is_library_file(filename)


_is_user_module = is_user_module


_source_digests: dict[tuple[str, int, int], str] = {}


def _module_source_digest(module: types.ModuleType) -> str:
    """A user module used whole (passed as a value): the normalised code of its file (cached
    by the file's size and modification time)."""
    filename = getattr(module, "__file__", None) or ""
    try:
        st = os.stat(filename)
    except OSError:
        return "unreadable"
    cache_key = (filename, st.st_mtime_ns, st.st_size)
    found = _source_digests.get(cache_key)
    if found is None:
        try:
            with open(filename, encoding="utf-8") as f:
                found = normalised_source_digest(f.read())
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            found = "unreadable"
        _source_digests[cache_key] = found
    return found


@functools.lru_cache(maxsize=4096)
def _is_library_file(filename: str) -> bool:
    """Whether a module file lies in the standard library, site-packages or nbpipe (cached:
    registering 100,000 tasks asks it 100,000 times)."""
    return os.path.realpath(filename).startswith(_library_roots())


# --------------------------------------------------------------------------------------------
# Code


@dataclasses.dataclass(frozen=True)
class CodeIdentity:
    """Everything about a function's code that determines what it computes.

    ``code`` is the digest of the function's normalised AST; ``helpers`` maps the user-defined
    functions and classes it uses (recursively, through modules of the user's own code too) to
    digests of their code, ``defaults`` those with default values to their digests; ``globals``
    maps the global values they read to value digests, ``closure`` the variables of enclosing
    functions; ``modules`` maps library modules to versions. ``user_modules`` (not part of the
    digest) names the modules of the user's own code it reaches: they travel to the workers by
    value, so a worker runs the code that was hashed.
    """

    code: str
    helpers: dict[str, str]
    globals: dict[str, str]
    modules: dict[str, str]
    closure: dict[str, str] = dataclasses.field(default_factory=dict)
    defaults: dict[str, str] = dataclasses.field(default_factory=dict)
    user_modules: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        # Sealed: the tasks of one function share these parts and encode them only once.
        for part in ("helpers", "globals", "modules", "closure", "defaults"):
            object.__setattr__(self, part, SealedDict(getattr(self, part)))

    @property
    def digest(self) -> str:
        """One digest of all the parts."""
        return digest([self.code, self.helpers, self.globals, self.modules, self.closure,
                       self.defaults])


class _StripDocstrings(ast.NodeTransformer):
    def _strip(self, node: Any) -> Any:
        self.generic_visit(node)
        first = node.body[0] if node.body else None
        if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant) \
                and isinstance(first.value.value, str):
            node.body = node.body[1:] or [ast.Pass()]
        return node

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = visit_Module = _strip


def normalised_source_digest(source: str) -> str:
    """Digest of Python source with comments, docstrings and formatting removed.

    >>> normalised_source_digest("x = 1  # one") == normalised_source_digest("x=1")
    True
    """
    tree = _StripDocstrings().visit(ast.parse(textwrap.dedent(source)))
    return digest(ast.dump(tree, annotate_fields=True, include_attributes=False))


# --------------------------------------------------------------------------------------------
# What a piece of code reads: names, attribute chains on them, and the imports of its body


@dataclasses.dataclass
class _CodeInfo:
    digest: str
    names: tuple[str, ...]  # global (or closure) names the code reads
    chains: tuple[tuple[str, ...], ...] = ()  # attribute chains on them: ("mylib", "f")
    imports: tuple[tuple[str, str, str, int], ...] = ()  # in-body (local, module, attr, level)


_code_cache: dict[Any, _CodeInfo] = {}


def _chains(tree: ast.AST) -> tuple[tuple[str, ...], ...]:
    """Every ``a.b.c`` read in ``tree`` as ``("a", "b", "c")`` (and its prefixes)."""
    found: set[tuple[str, ...]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            parts: list[str] = []
            current: ast.AST = node
            while isinstance(current, ast.Attribute):
                parts.append(current.attr)
                current = current.value
            if isinstance(current, ast.Name):
                found.add((current.id, *reversed(parts)))
    return tuple(sorted(found))


def _imports(tree: ast.AST) -> tuple[tuple[str, str, str, int], ...]:
    """The imports inside a function body or a cell: (local name, module, attribute, level).

    ``import pkg.sub`` binds ``pkg`` (and imports ``pkg.sub``); ``import pkg.sub as s`` binds
    ``s`` to ``pkg.sub``; ``from m import f as g`` binds ``g`` to ``m.f``.
    """
    found: list[tuple[str, str, str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                local = alias.asname or alias.name.partition(".")[0]
                found.append((local, alias.name, "" if alias.asname else "*top", 0))
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if alias.name != "*":
                    found.append((alias.asname or alias.name, node.module or "", alias.name,
                                  node.level))
    return tuple(found)


def _function_ast(fn: Any) -> ast.AST | None:
    # A function's own code object, not inspect's unwrapping: a decorator's wrapper made with
    # functools.wraps is its own code (what it wraps is followed as a closure variable).
    code = getattr(fn, "__code__", None)
    try:
        source = textwrap.dedent(inspect.getsource(code if code is not None else fn))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError, IndentationError):
        return None
    name = code.co_name if code is not None else getattr(fn, "__name__", None)
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if node.name != name:
                return None
            if isinstance(node, ast.ClassDef):
                node.decorator_list = [d for d in node.decorator_list if _is_dataclass_decorator(d)]
            else:
                node.decorator_list = []  # decorator options are resources, not identity
            node.name = "_"  # names are not identity either
            return _StripDocstrings().visit(node)
    return None


def _is_dataclass_decorator(node: ast.AST) -> bool:
    """``@dataclass(frozen=True, order=True)`` changes what a class's objects do: it counts."""
    target = node.func if isinstance(node, ast.Call) else node
    return isinstance(target, (ast.Name, ast.Attribute)) and "dataclass" in ast.unparse(target)


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _bytecode_digest(code: types.CodeType) -> str:
    """Fallback when the source is not available: bytecode and constants, no line numbers."""
    consts = []
    for i, const in enumerate(code.co_consts):
        if isinstance(const, types.CodeType):
            consts.append(_bytecode_digest(const))
        elif i == 0 and isinstance(const, str) and code.co_flags & inspect.CO_NEWLOCALS:
            consts.append(None)  # a docstring (or a first string constant): not identity
        else:
            try:
                consts.append(digest(const))
            except Unencodable:
                consts.append(repr(const))
    return digest([code.co_code, consts, list(code.co_names), list(code.co_varnames)])


def _methods(cls: type) -> list[Any]:
    """The functions a class defines (methods, static and class methods, property accessors),
    less those dataclasses and friends generate (their code is the class's fields)."""
    found = []
    for value in vars(cls).values():
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        parts = [value.fget, value.fset, value.fdel] if isinstance(value, property) else [value]
        for part in parts:
            code = getattr(part, "__code__", None)
            if isinstance(part, types.FunctionType) and code is not None \
                    and code.co_filename != "<string>":
                found.append(part)
    return found


def _class_info(cls: type, tree: ast.AST | None) -> _CodeInfo:
    methods = _methods(cls)
    infos = [_code_info(m) for m in methods]
    names: set[str] = set().union(*(i.names for i in infos)) if infos else set()
    chains: set[tuple[str, ...]] = set().union(*(i.chains for i in infos)) if infos else set()
    imports = [imp for i in infos for imp in i.imports]
    if tree is not None:
        assert isinstance(tree, ast.ClassDef)
        # The class body outside its methods: bases, keywords, decorators, class attributes.
        outside = [*tree.bases, *tree.keywords, *tree.decorator_list]
        outside += [n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for node in outside:
            names |= {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            chains |= set(_chains(node))
        code = digest(ast.dump(tree, include_attributes=False))
    else:  # no source (some notebook classes): the code of its methods
        code = digest([cls.__name__, {m.__name__: i.digest for m, i in zip(methods, infos, strict=True)}])
    names |= {b.__name__ for b in cls.__bases__ if b is not object and _is_user_code(b)}
    return _CodeInfo(code, tuple(sorted(names)), tuple(sorted(chains)), tuple(imports))


def _code_info(fn: Any) -> _CodeInfo:
    code = getattr(fn, "__code__", None)
    cache_key = code if code is not None else fn
    info = _code_cache.get(cache_key)
    if info is not None:
        return info
    tree = _function_ast(fn)
    if isinstance(fn, type):
        info = _class_info(fn, tree)
    elif code is None:
        raise Unencodable(_qualname(fn))
    else:
        read = _code_names(code) | set(code.co_freevars)
        if tree is not None:
            loads = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
            read &= loads | set(code.co_freevars)
            info = _CodeInfo(digest(ast.dump(tree, include_attributes=False)), tuple(sorted(read)),
                             _chains(tree), _imports(tree))
        else:
            info = _CodeInfo(_bytecode_digest(code), tuple(sorted(read)))
    _code_cache[cache_key] = info
    return info


def _unwrap(obj: Any) -> Any:
    """The plain function behind a TaskFunction (or anything exposing ``__nbpipe_function__``)."""
    inner = getattr(obj, "__nbpipe_function__", None)
    return inner if inner is not None else obj


# --------------------------------------------------------------------------------------------
# Names an interactive shell puts in the user namespace in place of builtins

_stand_ins: dict[str, Any] = {}


def register_stand_ins(names: dict[str, Any]) -> None:
    """Names a shell binds in the user namespace in place of a builtin (IPython's own ``open``,
    ``exit``, ``quit``): code that reads them counts as reading the builtin, so a notebook and
    its exported script give the same keys."""
    _stand_ins.update(names)


def is_stand_in(name: str, value: Any) -> bool:
    """Whether ``value`` bound to ``name`` is a shell's stand-in for the builtin ``name``."""
    return name in _stand_ins and _stand_ins[name] is value


def _lookup(fn: Any, name: str) -> tuple[bool, Any]:
    code = getattr(fn, "__code__", None)
    if code is not None and fn.__closure__ and name in code.co_freevars:
        cell = fn.__closure__[code.co_freevars.index(name)]
        try:
            return True, cell.cell_contents
        except ValueError:  # an empty cell
            return False, None
    if isinstance(fn, types.ModuleType):
        module_globals = vars(fn)
    else:
        module_globals = getattr(fn, "__globals__", None)
        if module_globals is None:
            module = sys.modules.get(getattr(fn, "__module__", "") or "")
            module_globals = vars(module) if module is not None else {}
    if name in module_globals:
        value = module_globals[name]
        if _stand_ins and is_stand_in(name, value):
            return False, None  # the builtin it stands for
        return True, value
    return False, None


def _import(module: str, level: int, holder: Any) -> tuple[str, types.ModuleType | None]:
    """The absolute name of an import in ``holder``'s code, and the module when it is the user's
    own code (imported, as the task will); library modules are not imported here."""
    if level:
        package = getattr(sys.modules.get(getattr(holder, "__module__", "") or ""), "__package__",
                          None) or ""
        try:
            module = importlib.util.resolve_name("." * level + module, package)
        except (ImportError, ValueError):
            return module, None
    top = module.partition(".")[0]
    if top in sys.stdlib_module_names:
        return module, None
    loaded = sys.modules.get(module)
    if loaded is None:
        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            return module, None
        origin = getattr(spec, "origin", None)
        if spec is None or not origin or origin in ("built-in", "frozen") \
                or _is_library_file(origin):
            return module, None
        try:
            loaded = importlib.import_module(module)
        except Exception:  # it fails on the worker too, where the error is shown
            return module, None
    return module, loaded if _is_user_module(loaded) else None


_ABSENT, _SAME, _EQUAL = "absent", "same", "equal"  # what a memo checks about a name


@dataclasses.dataclass
class _Memo:
    """A function's last identity, with what must still hold for it to be current: each name its
    code (and its helpers' code) reads is still absent, still bound to the same object, or, for
    mutable values, still bound to a value with the same digest."""

    identity: CodeIdentity
    checks: list[tuple[Any, str, str, Any]]  # (holder or None for the function, name, how, what)


_memos: weakref.WeakKeyDictionary[Any, _Memo] = weakref.WeakKeyDictionary()


def is_immutable(value: Any) -> bool:
    """Whether ``value`` cannot change in place (numbers, strings, tuples of them, ...)."""
    if type(value) in (tuple, frozenset):
        return all(is_immutable(v) for v in value)
    return value is None or isinstance(
        value, (int, float, complex, str, bytes, PurePath, enum.Enum, _dt.date, _dt.time,
                _dt.timedelta))


def _find(fn: Any, holder: Any, name: str) -> tuple[bool, Any]:
    """A name as a check sees it: in a function's globals or closure, a module's attribute, or
    (``"import:NAME"``) the module an import in the body gives."""
    if name.startswith("import:"):
        module = sys.modules.get(name[7:])
        return module is not None, module
    if name == "__source__":  # a module used whole: its file, compared by digest
        return True, holder
    return _lookup(fn if holder is None else holder, name)


def _still_current(fn: Any, memo: _Memo) -> bool:
    for holder, name, how, what in memo.checks:
        found, value = _find(fn, holder, name)
        if how == _ABSENT:
            if found:
                return False
        elif not found:
            return False
        elif how == _SAME:
            if value is not what:
                return False
        else:
            try:
                if digest(_unwrap(value)) != what:
                    return False
            except Unencodable:
                return False
    return True


def code_identity(fn: Callable[..., Any], *, owner: str = "") -> CodeIdentity:
    """The :class:`CodeIdentity` of ``fn``, following the helpers and globals it uses.

    Registering many tasks of one function computes it once: later calls only check that the
    names it reads are bound as before (immutable values and code by object, mutable values by
    digest), so a changed global or a redefined helper still changes the identity.

    Raises :class:`~nbpipe.errors.UnhashableValue` naming the global when one of the values it
    reads has no deterministic encoding. ``owner`` names the task in that message.
    """
    fn = _unwrap(fn)
    if not _is_user_code(fn):
        module = getattr(fn, "__module__", None) or "builtins"
        modules = {module.partition(".")[0]: module_version(module)}
        return CodeIdentity(digest(_qualname(fn)), {}, {}, modules)
    memo = _memos.get(fn)
    if memo is not None and _still_current(fn, memo):
        return memo.identity
    walk = _Walk(fn, owner or getattr(fn, "__name__", "?"))
    walk.run()
    memo = walk.memo()
    with contextlib.suppress(TypeError):  # a callable object that takes no weak references
        _memos[fn] = memo
    return memo.identity


def cell_identity(source: str, namespace: dict[str, Any], *, owner: str = "") -> CodeIdentity:
    """The identity of a ``%%task`` cell: its normalised code, and what it reaches through the
    user's own modules — imported in the cell, or read from ``namespace`` (the cell's inputs:
    their values are its arguments; a module's members it uses count here by content)."""
    tree = _StripDocstrings().visit(ast.parse(textwrap.dedent(source)))
    code = digest(ast.dump(tree, annotate_fields=True, include_attributes=False))
    holder = types.SimpleNamespace(__globals__=namespace, __module__="__main__", __name__=owner)
    info = _CodeInfo(code, tuple(sorted(n for n, v in namespace.items()
                                        if isinstance(v, types.ModuleType))),
                     _chains(tree), _imports(tree))
    walk = _Walk(holder, owner or "cell", root_info=info)
    walk.run()
    return walk.memo().identity


class _Walk:
    """Follow what ``fn`` reads, recursively through the user's own functions, classes and
    modules; collect the parts of its identity and the checks that keep it current."""

    def __init__(self, fn: Any, owner: str, root_info: _CodeInfo | None = None):
        self.fn = fn
        self.owner = owner
        self.root_info = root_info
        self.helpers: dict[str, str] = {}
        self.values: dict[str, str] = {}
        self.closure: dict[str, str] = {}
        self.defaults: dict[str, str] = {}
        self.modules: dict[str, str] = {}
        self.user_modules: set[str] = set()
        self.checks: list[tuple[Any, str, str, Any]] = []
        self.seen: set[int] = {id(fn)}
        self.stack: list[Any] = [fn]
        self._digests: dict[int, str] = {}  # a value read under several names is hashed once

    def _digest(self, value: Any) -> str:
        text = self._digests.get(id(value))
        if text is None:
            text = self._digests[id(value)] = digest(value)
        return text

    def memo(self) -> _Memo:
        info = self.root_info or _code_info(self.fn)
        return _Memo(CodeIdentity(info.digest, self.helpers, self.values, self.modules,
                                  self.closure, self.defaults, frozenset(self.user_modules)),
                     self.checks)

    def run(self) -> None:
        while self.stack:
            current = self.stack.pop()
            info = self.root_info if current is self.fn and self.root_info else _code_info(current)
            holder = None if current is self.fn else current
            module = getattr(current, "__module__", "") or ""
            own = module == getattr(self.fn, "__module__", None)
            chains_by_root: dict[str, list[tuple[str, ...]]] = {}
            for chain in info.chains:
                chains_by_root.setdefault(chain[0], []).append(chain[1:])
            code = getattr(current, "__code__", None)
            freevars = set(code.co_freevars) if code is not None else set()
            for name in info.names:
                found, raw = _lookup(current, name)
                if not found:
                    self.checks.append((holder, name, _ABSENT, None))
                    continue  # a builtin, or a name defined later
                label = name if own else f"{module}.{name}"
                self.checks.append((holder, name, self._how(raw), self._what(raw)))
                self._consider(raw, label, chains_by_root.get(name, ()), closure=name in freevars)
            for local, target, attr, level in info.imports:
                self._import(current, holder, local, target, attr, level,
                             chains_by_root.get(local, ()))

    @staticmethod
    def _how(raw: Any) -> str:
        value = _unwrap(raw)
        if isinstance(value, (types.FunctionType, types.ModuleType, type)) or is_immutable(value):
            return _SAME
        return _EQUAL

    def _what(self, raw: Any) -> Any:
        if self._how(raw) == _SAME:
            return raw
        try:
            return self._digest(_unwrap(raw))
        except Unencodable:
            return None  # _consider raises the error that names it

    def _consider(self, raw: Any, label: str, chains: Iterable[tuple[str, ...]], *,
                  closure: bool = False) -> None:
        value = _unwrap(raw)
        if isinstance(value, types.ModuleType):
            self._module(value, label, chains)
        elif isinstance(value, (types.FunctionType, type)) and _is_user_code(value):
            self._helper(value, label)
        elif isinstance(value, (types.FunctionType, types.BuiltinFunctionType, type)):
            top = (getattr(value, "__module__", None) or "builtins").partition(".")[0]
            if top != "builtins":
                self.modules[top] = module_version(top)
        elif callable(value) and isinstance(getattr(value, "__wrapped__", None),
                                            (types.FunctionType, type)) \
                and not _is_user_code(type(value)):
            self._helper(value.__wrapped__, label)  # functools.lru_cache / cache around it
        else:
            try:
                text = self._digest(value)
            except Unencodable as exc:
                kind = "closure variable" if closure else "global"
                raise UnhashableValue(
                    f"task {self.owner!r} reads {kind} {label!r}{exc.path}, a "
                    f"{exc.typename}, which nbpipe cannot hash deterministically; pass it "
                    "as an argument of a type nbpipe can hash (numbers, strings, paths, "
                    "lists, dicts, numpy arrays, dataclasses, objects of your own classes), "
                    "give its class a __nbpipe_token__() method, or build it inside the task"
                ) from None
            (self.closure if closure else self.values)[label] = text
            for module in _user_modules_of(value):
                self.user_modules.add(module)

    def _helper(self, value: Any, label: str) -> None:
        """A user function or class: its code and its defaults count, and what it reads."""
        if id(value) in self.seen:
            return
        self.seen.add(id(value))
        try:
            info = _code_info(value)
        except Unencodable:
            return
        self.helpers[label] = info.digest
        defaults = _defaults(value)
        if defaults is not None:
            self.defaults[label] = digest(defaults)
        if value.__module__ and value.__module__ != "__main__":
            module = sys.modules.get(value.__module__)
            if module is not None and _is_user_module(module):
                self.user_modules.add(module.__name__)
        self.stack.append(value)

    def _module(self, module: types.ModuleType, label: str,
                chains: Iterable[tuple[str, ...]]) -> None:
        if not _is_user_module(module):
            top = module.__name__.partition(".")[0]
            self.modules[top] = module_version(top)
            return
        self.user_modules.add(module.__name__)
        chains = [c for c in chains if c]
        if not chains:  # the module itself is used (passed on, or its members read by name)
            self.helpers[f"{module.__name__} (whole module)"] = _module_source_digest(module)
            self.checks.append((module, "__source__", _EQUAL, digest(module)))
            return
        for chain in chains:  # mylib.f, pkg.sub.K: members of the user's modules, by content
            owner, attr = module, chain[0]
            rest = chain[1:]
            while True:
                found, raw = _lookup(owner, attr)
                self.checks.append((owner, attr, _ABSENT if not found else self._how(raw),
                                    None if not found else self._what(raw)))
                if not found:
                    break
                value = _unwrap(raw)
                if isinstance(value, types.ModuleType) and rest and _is_user_module(value):
                    self.user_modules.add(value.__name__)
                    owner, attr, rest = value, rest[0], rest[1:]
                    continue
                member = f"{owner.__name__}.{attr}"
                self._consider(raw, member, [rest] if rest else ())
                break

    def _import(self, current: Any, holder: Any, local: str, target: str, attr: str, level: int,
                chains: Iterable[tuple[str, ...]]) -> None:
        """An import in a function body or a cell: the user's own modules are followed."""
        name, module = _import(target, level, current)
        if module is None:
            top = name.partition(".")[0]
            if top:
                self.modules[top] = module_version(top)
            return
        self.checks.append((holder, f"import:{name}", _SAME, module))
        if attr == "*top":  # import pkg.sub binds pkg
            top = sys.modules.get(name.partition(".")[0], module)
            self._module(top, local, chains)
        elif attr:  # from mylib import f
            found, raw = _lookup(module, attr)
            if not found:
                submodule = sys.modules.get(f"{name}.{attr}")
                found, raw = submodule is not None, submodule
            self.checks.append((module, attr, _ABSENT if not found else self._how(raw),
                                None if not found else self._what(raw)))
            if found:
                self._consider(raw, f"{name}.{attr}", chains)
        else:  # import pkg.sub as s
            self._module(module, local, chains)


def _defaults(fn: Any) -> Any:
    """The default values of a function's parameters (``def f(x, n=N)`` reads ``N`` when it is
    defined): ``None`` when it has none."""
    if isinstance(fn, type):
        return None
    values = (getattr(fn, "__defaults__", None) or (), getattr(fn, "__kwdefaults__", None) or {})
    if not values[0] and not values[1]:
        return None
    encoded = []
    for value in (*values[0], *values[1].items()):
        try:
            encoded.append(digest(value))
        except Unencodable:  # a sentinel object(): what it is, not which one
            encoded.append(_qualname(type(value)))
    return encoded


def _user_modules_of(value: Any) -> frozenset[str]:
    """The user modules an object's class (and its user base classes) come from: they travel
    by value too."""
    cls = type(value)
    if not _is_user_code(cls) or isinstance(value, type):
        return frozenset()
    found = set(code_identity(cls).user_modules)
    for base in cls.__mro__:
        module = sys.modules.get(getattr(base, "__module__", "") or "")
        if module is not None and module.__name__ != "__main__" and _is_user_module(module):
            found.add(module.__name__)
    return frozenset(found)
