"""What a cell reads and what it defines, found statically with Python's scoping rules.

>>> scope = analyze("import numpy as np\\nmean = data.mean()\\nsq = [x * x for x in data]")
>>> scope.reads, scope.writes
(['data'], ['mean', 'sq'])

Reads are the names the cell takes from outside (in order of first use); writes are the names
assigned at the cell's top level (imports excluded: a module is not a result). Comprehension
variables, function parameters and locals, class bodies, ``global`` and ``nonlocal``
declarations, ``del``, augmented assignment and the walrus operator follow Python's rules, block by
block as marimo's visitor does: a ``global x`` in a nested function concerns that function only,
and an ``except E as e`` name is deleted when its handler ends (it is not an output).

Names bound last by ``with ... as NAME`` or to a generator expression are *transient*, with
why: the context's object (a file, a lock) is closed when the block ends, and a generator runs
once and cannot be stored; they are not outputs either.

>>> scope = analyze("with open(path) as f:\\n    text = f.read()\\nwords = (w for w in text.split())")
>>> scope.writes, scope.transient
(['text'], {'f': 'with', 'words': 'generator'})
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field

__all__ = ["CellScope", "analyze", "analyze_tree"]


@dataclass
class CellScope:
    """The names a cell reads from outside and the names it defines at top level."""

    reads: list[str] = field(default_factory=list)
    writes: list[str] = field(default_factory=list)
    imports: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    transient: dict[str, str] = field(default_factory=dict)  # name -> "with" | "generator"
    import_lines: dict[str, str] = field(default_factory=dict)  # imported name -> its import


class _Scope:
    def __init__(self, kind: str, parent: _Scope | None):
        self.kind = kind  # module | function | class | comprehension
        self.parent = parent
        self.defined: set[str] = set()
        self.globals: set[str] = set()
        self.nonlocals: set[str] = set()


_NESTED = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef, ast.ListComp,
           ast.SetComp, ast.GeneratorExp, ast.DictComp)


def _scope_nodes(nodes: list[ast.AST]) -> list[ast.AST]:
    """The nodes of one scope: of a nested function, class or comprehension only the parts that
    run in this scope (its name, decorators, defaults, bases, first iterable), and the walrus
    targets of a comprehension (they bind here)."""
    out: list[ast.AST] = []
    stack = list(reversed(nodes))
    while stack:
        node = stack.pop()
        out.append(node)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            args = node.args
            parts: list[ast.AST] = [*args.defaults, *(d for d in args.kw_defaults if d is not None)]
            if not isinstance(node, ast.Lambda):
                parts += node.decorator_list
                parts += [a.annotation for a in [*args.posonlyargs, *args.args, *args.kwonlyargs,
                                                 args.vararg, args.kwarg]
                          if a is not None and a.annotation is not None]
                parts += [node.returns] if node.returns is not None else []
            stack.extend(reversed(parts))
        elif isinstance(node, ast.ClassDef):
            stack.extend(reversed([*node.decorator_list, *node.bases, *(k.value for k in node.keywords)]))
        elif isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            stack.append(node.generators[0].iter)
            out.extend(n.target for n in ast.walk(node) if isinstance(n, ast.NamedExpr))
        else:
            stack.extend(reversed(list(ast.iter_child_nodes(node))))
    return out


def _bound_names(nodes: list[ast.AST]) -> tuple[set[str], set[str], set[str]]:
    """What one scope binds, declares ``global`` and declares ``nonlocal`` (nested scopes apart)."""
    names: set[str] = set()
    globals_: set[str] = set()
    nonlocals: set[str] = set()
    for child in _scope_nodes(nodes):
        if isinstance(child, ast.Name) and isinstance(child.ctx, (ast.Store, ast.Del)):
            names.add(child.id)
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(child.name)
        elif isinstance(child, (ast.Import, ast.ImportFrom)):
            for alias in child.names:
                names.add((alias.asname or alias.name).partition(".")[0])
        elif isinstance(child, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)) and child.name:
            names.add(child.name)
        elif isinstance(child, ast.MatchMapping) and child.rest:
            names.add(child.rest)
        elif isinstance(child, ast.Global):
            globals_.update(child.names)
        elif isinstance(child, ast.Nonlocal):
            nonlocals.update(child.names)
    return names, globals_, nonlocals


class _Visitor(ast.NodeVisitor):
    def __init__(self) -> None:
        self.module = _Scope("module", None)
        self.scope = self.module
        self.result = CellScope()
        self._reads: dict[str, None] = {}
        self._writes: dict[str, None] = {}
        self._transient: dict[str, str] = {}
        self._deferred: list[tuple[ast.AST, _Scope]] = []

    # -- name resolution ----------------------------------------------------------------------

    def _binding_scope(self, name: str) -> _Scope:
        scope = self.scope
        if name in scope.globals:
            return self.module
        if scope.kind == "comprehension":  # walrus targets bind in the enclosing function
            while scope.kind == "comprehension" and scope.parent is not None:
                scope = scope.parent
        return scope

    def _define(self, name: str, *, imported: bool = False) -> None:
        scope = self._binding_scope(name)
        if name in scope.nonlocals:
            return
        scope.defined.add(name)
        if scope is self.module:
            self._transient.pop(name, None)  # bound again: a `with ... as` value no longer
            if imported:
                self.result.imports.append(name)
                self._writes.pop(name, None)
            else:
                self._writes[name] = None
            if name in self.result.deleted:
                self.result.deleted.remove(name)

    def _read(self, name: str) -> None:
        scope: _Scope | None = self.scope
        if name in self.scope.globals:
            scope = self.module
        while scope is not None:
            if name in scope.defined and (scope.kind != "class" or scope is self.scope):
                return
            scope = scope.parent
        self._reads.setdefault(name, None)

    # -- nodes ---------------------------------------------------------------------------------

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load):
            self._read(node.id)
        elif isinstance(node.ctx, ast.Store):
            self._define(node.id)
        else:  # del
            self._read(node.id)
            scope = self._binding_scope(node.id)
            scope.defined.discard(node.id)
            if scope is self.module:
                self._writes.pop(node.id, None)
                self.result.deleted.append(node.id)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        self.visit(node.value)
        if isinstance(node.target, ast.Name):
            self._read(node.target.id)
            self._define(node.target.id)
        else:
            self.visit(node.target)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)
        if self.scope.kind != "function":
            self.visit(node.annotation)
        if node.value is not None or not isinstance(node.target, ast.Name):
            self.visit(node.target)

    def visit_Assign(self, node: ast.Assign) -> None:
        self.visit(node.value)  # the value is evaluated before the targets are bound
        for target in node.targets:
            self.visit(target)
            if (isinstance(node.value, ast.GeneratorExp) and isinstance(target, ast.Name)
                    and self._binding_scope(target.id) is self.module):
                self._transient[target.id] = "generator"

    def visit_NamedExpr(self, node: ast.NamedExpr) -> None:
        self.visit(node.value)
        self._define(node.target.id)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            name = (alias.asname or alias.name).partition(".")[0]
            self._define(name, imported=True)
            if self.scope is self.module:
                self.result.import_lines[name] = ast.unparse(ast.Import(names=[alias]))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        for alias in node.names:
            if alias.name != "*":
                self._define(alias.asname or alias.name, imported=True)
                if self.scope is self.module:
                    self.result.import_lines[alias.asname or alias.name] = ast.unparse(
                        ast.ImportFrom(module=node.module, names=[alias], level=node.level))

    def visit_Global(self, node: ast.Global) -> None:
        self.scope.globals.update(node.names)

    def visit_Nonlocal(self, node: ast.Nonlocal) -> None:
        self.scope.nonlocals.update(node.names)

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        if node.type is not None:
            self.visit(node.type)
        if node.name:
            self._define(node.name)
        for stmt in node.body:
            self.visit(stmt)
        if node.name and self._binding_scope(node.name) is self.module:
            # Python deletes the name when the handler ends: never an output
            self.module.defined.discard(node.name)
            self._writes.pop(node.name, None)

    def _with(self, node: ast.With | ast.AsyncWith) -> None:
        for item in node.items:
            self.visit(item.context_expr)
            if item.optional_vars is not None:
                self.visit(item.optional_vars)
                if self.scope is self.module:
                    for name in ast.walk(item.optional_vars):
                        if isinstance(name, ast.Name) and name.id not in self.module.globals:
                            self._transient[name.id] = "with"
        for stmt in node.body:
            self.visit(stmt)

    visit_With = visit_AsyncWith = _with

    def visit_MatchAs(self, node: ast.MatchAs) -> None:
        if node.pattern is not None:
            self.visit(node.pattern)
        if node.name:
            self._define(node.name)

    def visit_MatchStar(self, node: ast.MatchStar) -> None:
        if node.name:
            self._define(node.name)

    def visit_MatchMapping(self, node: ast.MatchMapping) -> None:
        self.generic_visit(node)
        if node.rest:
            self._define(node.rest)

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        args = node.args
        for default in [*args.defaults, *(d for d in args.kw_defaults if d is not None)]:
            self.visit(default)
        if not isinstance(node, ast.Lambda):
            for deco in node.decorator_list:
                self.visit(deco)
            for a in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
                if a is not None and a.annotation is not None:
                    self.visit(a.annotation)
            if node.returns is not None:
                self.visit(node.returns)
            self._define(node.name)
        scope = _Scope("function", self.scope)
        # Bodies run later, when everything the cell defines exists: analyse them at the end.
        self._deferred.append((node, scope))

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def _run_function_body(self, node: ast.AST, scope: _Scope) -> None:
        saved, self.scope = self.scope, scope
        body = node.body if isinstance(node.body, list) else [node.body]
        # Only this function's own declarations: a `global x` in a nested function makes `x`
        # global there, not here.
        local, scope.globals, scope.nonlocals = _bound_names(body)
        local -= scope.globals | scope.nonlocals
        args = node.args
        local |= {a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs,
                                  args.vararg, args.kwarg] if a is not None}
        scope.defined |= local
        for stmt in body:
            self.visit(stmt)
        self.scope = saved

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for expr in [*node.decorator_list, *node.bases, *(k.value for k in node.keywords)]:
            self.visit(expr)
        saved, self.scope = self.scope, _Scope("class", self.scope)
        for stmt in node.body:
            self.visit(stmt)
        self.scope = saved
        self._define(node.name)

    def _comprehension(self, node: ast.ListComp | ast.SetComp | ast.GeneratorExp | ast.DictComp) -> None:
        generators = node.generators
        self.visit(generators[0].iter)  # the first iterable is evaluated outside
        saved, self.scope = self.scope, _Scope("comprehension", self.scope)
        for i, gen in enumerate(generators):
            if i:
                self.visit(gen.iter)
            for name in ast.walk(gen.target):
                if isinstance(name, ast.Name):
                    self.scope.defined.add(name.id)
            for cond in gen.ifs:
                self.visit(cond)
        if isinstance(node, ast.DictComp):
            self.visit(node.key)
            self.visit(node.value)
        else:
            self.visit(node.elt)
        self.scope = saved

    visit_ListComp = visit_SetComp = visit_GeneratorExp = visit_DictComp = _comprehension

    def finish(self) -> CellScope:
        while self._deferred:
            node, scope = self._deferred.pop(0)
            self._run_function_body(node, scope)
        self.result.reads = list(self._reads)
        self.result.transient = {t: why for t, why in self._transient.items() if t in self._writes}
        self.result.writes = [w for w in self._writes
                              if w not in self.result.imports and w not in self._transient]
        self.result.import_lines = {n: line for n, line in self.result.import_lines.items()
                                    if n in self.result.imports}
        return self.result


def analyze(source: str) -> CellScope:
    """The :class:`CellScope` of Python ``source`` (raises ``SyntaxError`` on bad code)."""
    return analyze_tree(ast.parse(source))


def analyze_tree(tree: ast.Module) -> CellScope:
    """The :class:`CellScope` of a parsed module."""
    visitor = _Visitor()
    for stmt in tree.body:
        visitor.visit(stmt)
    return visitor.finish()
