"""The AttnRes rewrite of a decoder's forwards (interim Python emitter).

Given the source of a base model's ``forward`` (the one with the loop over ``self.layers``)
and of its decoder layer's ``forward``, this module finds

* in the model forward: the one ``for`` loop over ``self.layers`` whose body calls the loop
  variable as ``H = layer(H, kw=...)`` (only the stream positional), and
* in the layer forward: the residual stream (the first parameter, names aliasing it, and the
  targets of residual adds) and every residual add ``T = a + b [+ c]`` in which exactly one
  operand is the current stream,

and emits forwards that carry the AttnRes state as explicit positional tensors (so gradient
checkpointing and ``torch.compile`` see them as inputs). Anything else is refused with a
reason code of :data:`REASONS`. Text is spliced by byte range, never regenerated.

The emitted code calls ``forward_rewrite.attnres.begin / finish`` (model) and ``enter / add /
leave`` (layer); see ``attnres.py`` for what they compute.
"""

from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass, field

STATE = "attnres_sources"

# Reason codes (kebab-case, stable): the README table mirrors this one.
REASONS: dict[str, str] = {
    "encoder-decoder": "the model is an encoder-decoder (its decoder reads an encoder through cross-attention)",
    "no-layer-loop": "no single `for` loop over `self.layers` calling each layer as `H = layer(H, kw=...)` in the base model's forward",
    "hybrid-layers": "the decoder stacks layers of more than one class (hybrid attention / recurrent stacks)",
    "recurrent-layer": "a layer holds a recurrent or state-space mixer (Mamba, RWKV, linear attention): its state is not a residual sum",
    "cross-attention": "the layer takes encoder states (cross-attention)",
    "layer-signature": "the layer forward takes `*args`, keyword-only or positional-only parameters, so the state cannot be passed positionally",
    "no-residual": "no residual add `T = stream + branch` was found in the layer forward",
    "residual-not-seen": "the stream is used in a way the pass does not follow (in-place add, add outside an assignment, add inside a loop)",
    "stale-residual": "a stream value is read after a residual add replaced it",
    "dynamic-sublayers": "the branches of an `if` do different numbers of residual adds and the test is not a static `self.` attribute",
    "layer-return": "the layer does not return the stream as a single name",
    "uses-super": "the forward calls `super()`, which an emitted forward cannot",
    "name-conflict": "the module already has an attribute or parameter named `attnres`",
}

DOC_DECORATORS = {
    "auto_docstring",
    "add_start_docstrings",
    "add_start_docstrings_to_model_forward",
    "replace_return_docstrings",
    "add_code_sample_docstrings",
    "add_end_docstrings",
}


class Refused(Exception):
    def __init__(self, code: str, detail: str):
        assert code in REASONS, code
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


@dataclass
class LayerPlan:
    """The emitted layer forward and how its residual adds are laid out."""

    source: str
    # Static slot counting: a list of (kind, payload). See ``count_slots``.
    tree: list = field(default_factory=list)


class _Splicer:
    def __init__(self, text: str):
        self.data = text.encode()
        self.starts = [0]
        for i, b in enumerate(self.data):
            if b == 0x0A:
                self.starts.append(i + 1)
        self.edits: list[tuple[int, int, bytes]] = []

    def off(self, line: int, col: int) -> int:
        return self.starts[line - 1] + col

    def span(self, node) -> tuple[int, int]:
        return self.off(node.lineno, node.col_offset), self.off(
            node.end_lineno, node.end_col_offset
        )

    def text(self, node) -> str:
        a, b = self.span(node)
        return self.data[a:b].decode()

    def replace(self, a: int, b: int, new: str):
        self.edits.append((a, b, new.encode()))

    def result(self) -> str:
        out = self.data
        for a, b, new in sorted(self.edits, key=lambda e: (e[0], e[1]), reverse=True):
            out = out[:a] + new + out[b:]
        return out.decode()


def _parse_function(source: str) -> tuple[str, ast.FunctionDef]:
    source = textwrap.dedent(source)
    tree = ast.parse(source)
    fn = tree.body[0]
    if not isinstance(fn, ast.FunctionDef):
        raise TypeError("not a function definition")
    return source, fn


def _drop_doc_decorators(sp: _Splicer, fn: ast.FunctionDef):
    for dec in fn.decorator_list:
        target = dec.func if isinstance(dec, ast.Call) else dec
        name = (
            target.attr
            if isinstance(target, ast.Attribute)
            else getattr(target, "id", None)
        )
        if name in DOC_DECORATORS:
            a, b = sp.span(dec)
            a -= 1  # the '@'
            while b < len(sp.data) and sp.data[b] != 0x0A:
                b += 1
            sp.replace(a, b + 1, "")


def _check_super(fn: ast.FunctionDef):
    for node in ast.walk(fn):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "super"
        ):
            raise Refused("uses-super", f"line {node.lineno}")


def _names_loaded(node) -> set[str]:
    return {
        n.id
        for n in ast.walk(node)
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
    }


def _flatten_add(node) -> list | None:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left = _flatten_add(node.left) or [node.left]
        right = _flatten_add(node.right) or [node.right]
        return left + right
    return None


def _is_static_test(node) -> bool:
    """`self.a`, `self.a.b`, `not X`, `X and Y`, comparisons of those with constants."""
    if isinstance(node, ast.Attribute):
        base = node
        while isinstance(base, ast.Attribute):
            base = base.value
        return isinstance(base, ast.Name) and base.id == "self"
    if isinstance(node, ast.Constant):
        return True
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return _is_static_test(node.operand)
    if isinstance(node, ast.BoolOp):
        return all(_is_static_test(v) for v in node.values)
    if isinstance(node, ast.Compare):
        return _is_static_test(node.left) and all(
            _is_static_test(c) for c in node.comparators
        )
    return False


class _LayerWalker:
    def __init__(self, sp: _Splicer, stream: str):
        self.sp = sp
        self.current = {stream}
        self.stale: set[str] = set()
        self.adds = 0

    def walk(self, stmts: list, slot: int) -> tuple[int, list]:
        """Walk a block from slot `slot`; returns (slot after, count tree)."""
        tree: list = []
        for st in stmts:
            if isinstance(st, ast.If):
                reads = _names_loaded(st.test)
                self._check_reads(reads, st)
                saved = (set(self.current), set(self.stale))
                s_body, t_body = self.walk(st.body, slot)
                after_body = (set(self.current), set(self.stale))
                self.current, self.stale = set(saved[0]), set(saved[1])
                s_else, t_else = self.walk(st.orelse, slot)
                self.current = after_body[0] & self.current
                self.stale = after_body[1] | self.stale | (after_body[0] ^ self.current)
                if s_body != s_else:
                    if not _is_static_test(st.test):
                        raise Refused(
                            "dynamic-sublayers",
                            f"line {st.lineno}: {s_body - slot} vs {s_else - slot} residual adds under `{self.sp.text(st.test)}`",
                        )
                    tree.append(("if", self.sp.text(st.test), t_body, t_else))
                    # Later adds would have different slot numbers on each path.
                    slot = max(s_body, s_else)
                    self.diverged = True
                else:
                    tree.append(("if", None, t_body, t_else))
                    slot = s_body
                continue
            if isinstance(st, (ast.For, ast.While, ast.AsyncFor, ast.With, ast.Try)):
                inner = [
                    n
                    for n in ast.walk(st)
                    if isinstance(n, ast.Name) and n.id in self.current
                ]
                if inner:
                    raise Refused(
                        "residual-not-seen",
                        f"line {st.lineno}: the stream is used inside a compound statement",
                    )
                continue
            if isinstance(st, ast.AugAssign):
                if (
                    isinstance(st.target, ast.Name)
                    and st.target.id in self.current | self.stale
                ):
                    raise Refused(
                        "residual-not-seen",
                        f"line {st.lineno}: in-place update of the stream",
                    )
                self._check_reads(_names_loaded(st), st)
                continue
            if isinstance(st, ast.Return):
                self._check_reads(_names_loaded(st), st)
                continue
            if isinstance(st, (ast.Assign, ast.AnnAssign)):
                targets = st.targets if isinstance(st, ast.Assign) else [st.target]
                value = st.value
                if value is None:
                    continue
                single = len(targets) == 1 and isinstance(targets[0], ast.Name)
                operands = _flatten_add(value)
                if single and operands is not None:
                    streams = [
                        o
                        for o in operands
                        if isinstance(o, ast.Name) and o.id in self.current
                    ]
                    if len(streams) == 1:
                        if getattr(self, "diverged", False):
                            raise Refused(
                                "dynamic-sublayers",
                                f"line {st.lineno}: a residual add after an `if` whose branches differ in adds",
                            )
                        branches = [o for o in operands if o is not streams[0]]
                        self._check_reads(
                            set().union(*(_names_loaded(b) for b in branches)), st
                        )
                        self._emit_add(st, targets[0].id, streams[0], branches, slot)
                        tree.append(("add", slot))
                        slot += 1
                        self.adds += 1
                        continue
                reads = _names_loaded(value)
                self._check_reads(reads, st)
                names = [
                    n.id
                    for t in targets
                    for n in ast.walk(t)
                    if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)
                ]
                if single and isinstance(value, ast.Name) and value.id in self.current:
                    self.current.add(names[0])
                    self.stale.discard(names[0])
                else:
                    for n in names:
                        self.current.discard(n)
                        self.stale.discard(n)
                continue
            self._check_reads(_names_loaded(st), st)
        return slot, tree

    def _check_reads(self, reads: set[str], st):
        bad = reads & self.stale
        if bad:
            raise Refused(
                "stale-residual",
                f"line {st.lineno}: `{min(bad)}` read after a residual add replaced it",
            )

    def _emit_add(self, st, target: str, stream: ast.Name, branches: list, slot: int):
        sp = self.sp
        if len(branches) == 1:
            branch = sp.text(branches[0])
        else:
            branch = " + ".join(f"({sp.text(b)})" for b in branches)
        call = (
            f"forward_rewrite.attnres.add(self, {slot}, {stream.id}, {branch}, {STATE})"
        )
        a, _ = sp.span(st)
        _, b = sp.span(st.value)
        sp.replace(a, b, f"{target}, {STATE} = {call}")
        self.stale |= self.current - {target}
        self.current = {target}
        self.stale.discard(target)


def count_slots(tree: list, layer) -> int:
    """The number of residual adds the layer instance runs (static `if` tests evaluated on it)."""
    n = 0
    for item in tree:
        if item[0] == "add":
            n += 1
        else:
            _, test, body, orelse = item
            if test is None:
                n += count_slots(body, layer)
            else:
                taken = eval(
                    compile(test, "<attnres test>", "eval"),
                    {"__builtins__": {}},
                    {"self": layer},
                )
                n += count_slots(body if taken else orelse, layer)
    return n


def emit_layer(source: str) -> LayerPlan:
    source, fn = _parse_function(source)
    _check_super(fn)
    sp = _Splicer(source)
    a = fn.args
    if a.vararg is not None or a.kwonlyargs or a.posonlyargs:
        raise Refused(
            "layer-signature",
            "the layer forward has *args, keyword-only or positional-only parameters",
        )
    if len(a.args) < 2:
        raise Refused("layer-signature", "the layer forward takes no stream argument")
    names = [x.arg for x in a.args]
    for cross in (
        "encoder_hidden_states",
        "encoder_outputs",
        "cross_attn_hidden_states",
    ):
        if cross in names:
            raise Refused("cross-attention", f"the layer forward takes `{cross}`")
    stream = a.args[1]
    # The parameter's end (its default included, when it has one).
    n_defaults = len(a.defaults)
    first_default = len(a.args) - n_defaults
    end_node = a.defaults[1 - first_default] if 1 >= first_default else stream
    _, end = sp.span(end_node)
    sp.replace(end, end, f", *{STATE}")
    _drop_doc_decorators(sp, fn)

    walker = _LayerWalker(sp, stream.arg)
    body = fn.body
    first = 0
    if (
        body
        and isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)
    ):
        first = 1
    if first >= len(body):
        raise Refused("no-residual", "the layer forward has no body")
    _, tree = walker.walk(body[first:], 0)
    if walker.adds == 0:
        raise Refused("no-residual", "no residual add in the layer forward")
    # Returns: every return must give the current stream as one name.
    _rewrite_returns(sp, fn, walker)
    # The prologue: replace the stream by the first sublayer's input.
    anchor = body[first]
    indent = " " * anchor.col_offset
    a0, _ = sp.span(anchor)
    sp.replace(
        a0,
        a0,
        f"{stream.arg}, {STATE} = forward_rewrite.attnres.enter(self, {stream.arg}, {STATE})\n{indent}",
    )
    out = sp.result()
    ast.parse(out)
    return LayerPlan(source=out, tree=tree)


def _rewrite_returns(sp: _Splicer, fn: ast.FunctionDef, walker: _LayerWalker):
    returns = [n for n in ast.walk(fn) if isinstance(n, ast.Return)]
    if not returns:
        raise Refused("layer-return", "the layer forward has no return")
    for r in returns:
        if not isinstance(r.value, ast.Name) or r.value.id not in walker.current:
            shown = sp.text(r.value) if r.value is not None else "None"
            raise Refused(
                "layer-return", f"line {r.lineno}: returns `{shown}`, not the stream"
            )
        sp.replace(
            *sp.span(r.value),
            f"forward_rewrite.attnres.leave(self, {r.value.id}, {STATE})",
        )


def _is_self_layers(node) -> bool:
    while isinstance(node, ast.Subscript):
        node = node.value
    return (
        isinstance(node, ast.Attribute)
        and node.attr == "layers"
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
    )


def emit_model(source: str) -> str:
    source, fn = _parse_function(source)
    _check_super(fn)
    sp = _Splicer(source)
    loops = []
    for node in ast.walk(fn):
        if isinstance(node, ast.For):
            it = node.iter
            var = None
            if _is_self_layers(it) and isinstance(node.target, ast.Name):
                var = node.target.id
            elif (
                isinstance(it, ast.Call)
                and isinstance(it.func, ast.Name)
                and it.func.id == "enumerate"
                and it.args
                and _is_self_layers(it.args[0])
                and isinstance(node.target, ast.Tuple)
                and len(node.target.elts) == 2
                and isinstance(node.target.elts[1], ast.Name)
            ):
                var = node.target.elts[1].id
            if var is not None:
                loops.append((node, var))
    if len(loops) != 1:
        raise Refused("no-layer-loop", f"{len(loops)} loops over `self.layers`")
    loop, var = loops[0]
    calls = [
        n
        for n in ast.walk(loop)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == var
    ]
    sites = [
        st
        for st in loop.body
        if isinstance(st, ast.Assign)
        and len(st.targets) == 1
        and isinstance(st.targets[0], ast.Name)
        and isinstance(st.value, ast.Call)
        and isinstance(st.value.func, ast.Name)
        and st.value.func.id == var
    ]
    if len(calls) != 1 or len(sites) != 1:
        raise Refused(
            "no-layer-loop",
            f"line {loop.lineno}: the layer is not called once as `H = {var}(H, ...)`",
        )
    site = sites[0]
    h = site.targets[0].id
    call = site.value
    if (
        len(call.args) != 1
        or not isinstance(call.args[0], ast.Name)
        or call.args[0].id != h
    ):
        raise Refused(
            "no-layer-loop",
            f"line {site.lineno}: the layer call passes more than the stream positionally",
        )
    _drop_doc_decorators(sp, fn)
    # The loop's stream read elsewhere in the loop body before the call is fine; after it, too.
    indent = " " * loop.col_offset
    a, _ = sp.span(loop)
    sp.replace(a, a, f"{STATE} = forward_rewrite.attnres.begin(self, {h})\n{indent}")
    ta, tb = sp.span(site.targets[0])
    sp.replace(ta, tb, f"{h}, *{STATE}")
    _, ae = sp.span(call.args[0])
    sp.replace(ae, ae, f", *{STATE}")
    _, le = sp.span(loop)
    # After the loop: the final mix (a statement at the loop's indentation).
    sp.replace(
        le, le, f"\n{indent}{h} = forward_rewrite.attnres.finish(self, {h}, {STATE})"
    )
    out = sp.result()
    ast.parse(out)
    return out
