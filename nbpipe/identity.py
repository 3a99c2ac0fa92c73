"""Content identity: an unambiguous encoding of values and code, and the digests built from it.

A task's key is the digest of its *components*: the normalised code of its function, the code
of the helpers and the values of the globals it uses (followed recursively), the versions of the
modules it touches, its arguments, its upstream keys, the content of its input files and its
``version``. Names and resources are not part of it.

Nothing here pickles: pickles of dicts and plain string joins collide or drift. Every value is
written as a type tag, a length and a payload, so two different values never share an encoding.

>>> digest({"b": 1, "a": (1.5, "x")}) == digest({"a": (1.5, "x"), "b": 1})
True
"""

from __future__ import annotations

import ast
import dataclasses
import datetime as _dt
import enum
import functools
import hashlib
import importlib.metadata
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

__all__ = ["CodeIdentity", "DictShape", "SealedDict", "Unencodable", "code_identity", "digest",
           "encode", "module_version"]


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
    elif hasattr(value, "__nbpipe_token__"):
        out.append(_frame(b"K", _qualname(type(value)).encode()))
        _encode(value.__nbpipe_token__(), out)
    elif isinstance(value, tuple) and hasattr(value, "_fields"):
        out.append(_frame(b"U", _qualname(type(value)).encode()))
        _encode_items(value, out)
    elif isinstance(value, dict):
        _encode_dict(value, out)
    elif isinstance(value, (set, frozenset)):
        try:
            items = sorted(_bytes(v) for v in value)
        except Unencodable as exc:
            exc.path = "{...}" + exc.path
            raise
        out.append(_frame(b"E", len(items).to_bytes(8, "little")))
        out.extend(items)
    elif isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        out.append(_frame(b"t", f"{type(value).__name__}:{value.isoformat()}".encode()))
    elif isinstance(value, _dt.timedelta):
        out.append(_frame(b"d", repr(value.total_seconds()).encode()))
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        out.append(_frame(b"C", _qualname(type(value)).encode()))
        _encode_dict({f.name: getattr(value, f.name) for f in dataclasses.fields(value)}, out)
    elif _is_numpy(value):
        _encode_numpy(value, out)
    elif isinstance(value, (types.FunctionType, types.BuiltinFunctionType, type)):
        out.append(_frame(b"G", code_identity(value).digest.encode()))
    elif isinstance(value, types.ModuleType):
        out.append(_frame(b"O", f"{value.__name__}=={module_version(value.__name__)}".encode()))
    elif hasattr(value, "__nbpipe_key__"):  # a TaskRef: identified by its upstream key
        out.append(_frame(b"R", value.__nbpipe_key__().encode()))
    else:
        raise Unencodable(_qualname(type(value)))


def _encode_dict(value: dict[Any, Any], out: list[bytes]) -> None:
    pairs = []
    for k, v in value.items():
        try:
            pairs.append((_bytes(k), _bytes(v)))
        except Unencodable as exc:
            exc.path = f"[{k!r}]" + exc.path
            raise
    pairs.sort()
    out.append(_frame(b"D", len(pairs).to_bytes(8, "little")))
    for k, v in pairs:
        out.append(k)
        out.append(v)


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

    ``shape.digest(extra)`` equals ``digest({**shape.fixed, **extra})`` for the extra keys named
    when the shape was made, but encodes the fixed entries only once.

    >>> shape = DictShape({"code": "c1", "kind": "python"}, ["args"])
    >>> shape.digest({"args": [1]}) == digest({"code": "c1", "kind": "python", "args": [1]})
    True
    """

    __slots__ = ("_count", "_parts", "fixed", "fixed_digest")

    def __init__(self, fixed: dict[str, Any], extra_keys: Iterable[str]):
        self.fixed = fixed
        self.fixed_digest = digest(fixed)
        entries: dict[bytes, tuple[bool, Any]] = {
            _bytes(k): (True, _bytes(k) + _bytes(v)) for k, v in fixed.items()}
        for name in extra_keys:
            entries[_bytes(name)] = (False, name)
        self._count = _frame(b"D", len(entries).to_bytes(8, "little"))
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
                _encode(extra[part[1]], out)
        return _hasher(b"".join(out)).hexdigest()


class SealedDict(dict):  # type: ignore[type-arg]
    """A dict that is never changed after it is built, so its encoding is computed once.

    The parts of a function's code identity are sealed: thousands of tasks of one function share
    them, and their keys encode them without walking them again.
    """

    __slots__ = ("_encoding",)

    def encoding(self) -> bytes:
        """The canonical encoding (the same bytes as a plain dict's)."""
        try:
            return self._encoding
        except AttributeError:
            out: list[bytes] = []
            _encode_dict(self, out)
            self._encoding: bytes = b"".join(out)
            return self._encoding


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
    paths = sysconfig.get_paths()
    roots = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    roots.add(os.path.dirname(os.__file__))
    roots.add(os.path.dirname(os.path.dirname(__file__)) + os.sep + "nbpipe")
    return tuple(sorted(os.path.realpath(r) for r in roots))


def _is_user_code(obj: Any) -> bool:
    """True for functions and classes of the user's own scripts and notebooks.

    Library code (standard library, site-packages, nbpipe itself) enters a key by its module's
    version instead of its code.
    """
    modname = getattr(obj, "__module__", None) or ""
    if modname.partition(".")[0] in ("nbpipe", "builtins"):
        return False
    module = sys.modules.get(modname)
    filename = getattr(module, "__file__", None)
    if module is None or not filename:
        return True  # __main__ of a notebook or an interactive session
    return not _is_library_file(filename)


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
    functions and classes it uses (recursively) to their code digests; ``globals`` maps the
    global values they read to value digests; ``modules`` maps library modules to versions.
    """

    code: str
    helpers: dict[str, str]
    globals: dict[str, str]
    modules: dict[str, str]

    def __post_init__(self) -> None:
        # Sealed: the tasks of one function share these parts and encode them only once.
        for part in ("helpers", "globals", "modules"):
            object.__setattr__(self, part, SealedDict(getattr(self, part)))

    @property
    def digest(self) -> str:
        """One digest of all four parts."""
        return digest([self.code, self.helpers, self.globals, self.modules])


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


@dataclasses.dataclass
class _CodeInfo:
    digest: str
    names: tuple[str, ...]  # global names the code reads


_code_cache: dict[Any, _CodeInfo] = {}


def _function_ast(fn: Any) -> ast.AST | None:
    try:
        source = textwrap.dedent(inspect.getsource(fn))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError, IndentationError):
        return None
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if node.name != getattr(fn, "__name__", None):
                return None
            node.decorator_list = []  # decorator options are resources, not identity
            node.name = "_"  # names are not identity either
            return _StripDocstrings().visit(node)
    return None


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


def _code_info(fn: Any) -> _CodeInfo:
    code = getattr(fn, "__code__", None)
    cache_key = code if code is not None else fn
    info = _code_cache.get(cache_key)
    if info is not None:
        return info
    tree = _function_ast(fn)
    if isinstance(fn, type):
        if tree is not None:
            loads = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
            info = _CodeInfo(digest(ast.dump(tree, include_attributes=False)), tuple(sorted(loads)))
        else:  # no source (some notebook classes): the code of its methods
            methods = {k: v for k, v in vars(fn).items() if isinstance(v, types.FunctionType)}
            parts = {k: _code_info(v).digest for k, v in methods.items()}
            names = set().union(*(_code_info(v).names for v in methods.values())) if methods else set()
            info = _CodeInfo(digest([fn.__name__, parts]), tuple(sorted(names)))
    elif code is None:
        raise Unencodable(_qualname(fn))
    else:
        read = _code_names(code) | set(code.co_freevars)
        if tree is not None:
            loads = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
            read &= loads | set(code.co_freevars)
            info = _CodeInfo(digest(ast.dump(tree, include_attributes=False)), tuple(sorted(read)))
        else:
            info = _CodeInfo(_bytecode_digest(code), tuple(sorted(read)))
    _code_cache[cache_key] = info
    return info


def _unwrap(obj: Any) -> Any:
    """The plain function behind a TaskFunction (or anything exposing ``__nbpipe_function__``)."""
    inner = getattr(obj, "__nbpipe_function__", None)
    return inner if inner is not None else obj


def _lookup(fn: Any, name: str) -> tuple[bool, Any]:
    code = getattr(fn, "__code__", None)
    if code is not None and fn.__closure__ and name in code.co_freevars:
        cell = fn.__closure__[code.co_freevars.index(name)]
        try:
            return True, cell.cell_contents
        except ValueError:  # an empty cell
            return False, None
    module_globals = getattr(fn, "__globals__", None)
    if module_globals is None:
        module = sys.modules.get(getattr(fn, "__module__", "") or "")
        module_globals = vars(module) if module is not None else {}
    if name in module_globals:
        return True, module_globals[name]
    return False, None


_ABSENT, _SAME, _EQUAL = "absent", "same", "equal"  # what a memo checks about a name


@dataclasses.dataclass
class _Memo:
    """A function's last identity, with what must still hold for it to be current: each name its
    code (and its helpers' code) reads is still absent, still bound to the same object, or, for
    mutable values, still bound to a value with the same digest."""

    identity: CodeIdentity
    checks: list[tuple[Any, str, str, Any]]  # (holder or None for the function, name, how, what)


_memos: weakref.WeakKeyDictionary[Any, _Memo] = weakref.WeakKeyDictionary()


def _immutable(value: Any) -> bool:
    if type(value) in (tuple, frozenset):
        return all(_immutable(v) for v in value)
    return value is None or isinstance(
        value, (int, float, complex, str, bytes, PurePath, enum.Enum, _dt.date, _dt.time,
                _dt.timedelta))


def _still_current(fn: Any, memo: _Memo) -> bool:
    for holder, name, how, what in memo.checks:
        found, value = _lookup(fn if holder is None else holder, name)
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
        modules = {fn.__module__.partition(".")[0]: module_version(fn.__module__)}
        return CodeIdentity(digest(_qualname(fn)), {}, {}, modules)
    memo = _memos.get(fn)
    if memo is not None and _still_current(fn, memo):
        return memo.identity
    memo = _walk(fn, owner or getattr(fn, "__name__", "?"))
    _memos[fn] = memo
    return memo.identity


def _walk(fn: Any, owner: str) -> _Memo:
    """Follow the names ``fn`` reads, recursively through user-defined helpers."""
    helpers: dict[str, str] = {}
    values: dict[str, str] = {}
    modules: dict[str, str] = {}
    checks: list[tuple[Any, str, str, Any]] = []
    root = _code_info(fn)
    seen: set[int] = {id(fn)}
    stack: list[Any] = [fn]
    while stack:
        current = stack.pop()
        holder = None if current is fn else current
        current_module = getattr(current, "__module__", "")
        for name in _code_info(current).names:
            found, raw = _lookup(current, name)
            if not found:
                checks.append((holder, name, _ABSENT, None))
                continue  # a builtin, or a name defined later
            label = name if current_module == fn.__module__ else f"{current_module}.{name}"
            value = _unwrap(raw)
            if isinstance(value, types.ModuleType):
                top = value.__name__.partition(".")[0]
                modules[top] = module_version(top)
            elif isinstance(value, (types.FunctionType, type)) and _is_user_code(value):
                checks.append((holder, name, _SAME, raw))
                if id(value) in seen:
                    continue
                seen.add(id(value))
                try:
                    helpers[label] = _code_info(value).digest
                except Unencodable:
                    continue
                stack.append(value)
                continue
            elif isinstance(value, (types.FunctionType, types.BuiltinFunctionType, type)):
                top = (getattr(value, "__module__", None) or "builtins").partition(".")[0]
                if top != "builtins":
                    modules[top] = module_version(top)
            else:
                try:
                    values[label] = digest(value)
                except Unencodable as exc:
                    raise UnhashableValue(
                        f"task {owner!r} reads global {label!r}{exc.path}, a "
                        f"{exc.typename}, which nbpipe cannot hash deterministically; pass it "
                        "as an argument of a type nbpipe can hash (numbers, strings, paths, "
                        "lists, dicts, numpy arrays, dataclasses), give its class a "
                        "__nbpipe_token__() method, or build it inside the task"
                    ) from None
                if not _immutable(value):
                    checks.append((holder, name, _EQUAL, values[label]))
                    continue
            checks.append((holder, name, _SAME, raw))
    return _Memo(CodeIdentity(root.digest, helpers, values, modules), checks)
