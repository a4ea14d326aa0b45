"""Program -> Model: resolve layer kinds and names, infer every shape, count parameters, and
validate the train/init blocks, before anything is allocated. Pure Python."""
from __future__ import annotations

import math
from dataclasses import dataclass

from . import layers as registry
from .args import CallValue, bind, bind_call, fmt
from .errors import FlowError, did_you_mean, size_text
from .layers.base import LayerError, from_written, show_shape
from .parse import Binding, Block, Call, Chain, Name, Program, parse_text, read_source
from .settings import BLOCKS, INITS, TRAIN


@dataclass
class Model:
    layers: list            # Layer instances, in order, each with .name, .in_shape, .out
    aliases: dict           # sub-chain binding name -> (first index, last index)
    train: dict             # validated train settings, defaults filled in
    init: dict              # layer name (or 'default') -> CallValue
    source: str
    file: str | None = None
    written: dict = None    # train keys written in the file -> their position (others are defaults)

    @property
    def input_shape(self):
        return self.layers[0].in_shape

    @property
    def loss(self):
        return self.layers[-1]

    def layer(self, name):
        """The layer a name refers to: its own name, or a sub-chain's name (its last layer)."""
        for l in self.layers:
            if l.name == name:
                return l
        if name in self.aliases:
            return self.layers[self.aliases[name][1]]
        raise KeyError(name)

    def error_at(self, key, message):
        """A FlowError at the train setting `key` (file:line:col), or at the file."""
        pos = (self.written or {}).get(key)
        return FlowError(message, self.file, pos.line if pos else None, pos.column if pos else None, self.source)

    def names(self):
        return [l.name for l in self.layers] + [a for a in self.aliases if a not in {l.name for l in self.layers}]

    def n_params(self):
        return sum(l.n_params(l.in_shape) for l in self.layers)

    def activation_floats(self):
        """Floats of forward activations for one sample (the memory that grows with batch)."""
        return sum(math.prod(l.out) for l in self.layers)

    def memory_estimate(self, batch, data_bytes=0):
        """Rough bytes needed to train at this batch size (flowdsl.memory.train_estimate)."""
        from .memory import train_estimate
        return train_estimate(self, batch, data_bytes)

    # --- printing -----------------------------------------------------------------------------
    def summary(self) -> str:
        rows = [("name", "layer", "output", "params")]
        for l in self.layers:
            rows.append((l.name, l.describe(), show_shape(l.out), f"{l.n_params(l.in_shape):,}"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        line = "-" * (sum(widths) + 6)
        out = [line]
        for i, r in enumerate(rows):
            out.append("  ".join(c.ljust(widths[j]) if j < 3 else c.rjust(widths[j]) for j, c in enumerate(r)))
            if i == 0:
                out.append(line)
        out.append(line)
        n = self.n_params()
        batch = self.train["batch"]
        out.append(f"Input: {show_shape(self.input_shape)}   Total: {n:,} weights ({size_text(n * 4, 2)} float32)")
        out.append(f"Training memory at batch {batch}: about {size_text(self.memory_estimate(batch))} (estimated, not allocated)")
        for a, (i, j) in self.aliases.items():
            if i != j:
                parts = [self.layers[i].feed_name] if self.layers[i].feed_name else []
                k = i
                while k <= j:   # a sub-chain inside by its name (b1 = stem :: conv2 :: ...)
                    inner = [(q, b) for b, (p, q) in self.aliases.items() if p == k and q < j and b != a]
                    if inner:
                        q, b = max(inner)
                        parts.append(b)
                        k = q + 1
                    else:
                        parts.append(self.layers[k].name)
                        k += 1
                out.append(f"{a} = {' :: '.join(parts)}")
        out += [f"note: {n}" for l in self.layers for n in l.notes()]
        return "\n".join(out)

    def __str__(self) -> str:
        """Canonical .flow source: parse(str(model)) gives the same model."""
        lines = []
        # every span of layers that has names, innermost name first: a bound layer's own name,
        # then sub-chain names in the order they were bound (`b = a` over `a = dense(2)`: a, b)
        named = {}
        for i, l in enumerate(self.layers):
            if not l.auto_name:
                named[(i, i)] = [l.name]
        for a, r in self.aliases.items():
            named.setdefault(r, []).append(a)
        emitted = set()
        # segments: runs of layers each reading the one before; a branch's first layer and a
        # concat that starts a chain begin a new one. A name is printed as the part of its span
        # in the segment it ends in (a branch that a concat joins is printed as its own binding)
        seg = []
        for i, l in enumerate(self.layers):
            seg.append(i if i == 0 or l.feed is not None else seg[-1])

        outside = set()   # branch layers whose `stem ::` is written in the chain that names them

        def shown(r):
            return (max(r[0], seg[r[1]]), r[1])

        index = {l.name: j for j, l in enumerate(self.layers)}

        def refs_first(i):
            # the bindings a layer names (concat's branches) are written before it; a name of a
            # layer inside a binding brings that binding (its outermost name)
            for ref in _refs(self.layers[i]):
                hits = [(r, names.index(ref)) for r, names in named.items() if ref in names]
                if not hits and ref in index:
                    j = index[ref]
                    spans = [r for r in named if r[0] <= j <= r[1] and r[1] < i]
                    if spans:
                        r = max(spans, key=lambda r: r[1] - r[0])
                        hits = [(r, len(named[r]) - 1)]
                for r, k in hits:
                    emit(r, k)

        def text(lo, hi, outer):
            # outer: (span, index) of the name being defined, or None for the network
            parts, i = [], lo
            while i <= hi:
                # the longest named span starting at i, using its outermost name; for the span
                # being defined, the name just inside it
                best = None
                for r, names in named.items():
                    if shown(r)[0] != i or r[1] > hi:
                        continue
                    k = len(names) - 1
                    if outer is not None and r == outer[0]:
                        k = outer[1] - 1
                        if k < 0:
                            continue
                    if best is None or r[1] > best[0][1]:
                        best = (r, k)
                if best is not None:
                    l = self.layers[i]
                    if l.feed_name is not None and i == lo:   # a branch whose first layer is bound
                        parts.append(l.feed_name)
                        outside.add(i)
                    emit(*best)
                    parts.append(named[best[0]][best[1]])
                    i = best[0][1] + 1
                else:
                    l = self.layers[i]
                    if l.feed_name is not None and i not in outside:   # a branch: `stem :: ...`
                        parts.append(l.feed_name)
                    refs_first(i)
                    parts.append(self._layer_text(i))
                    i += 1
            one = " :: ".join(parts)
            return one if len(one) < 90 else "\n    :: ".join(parts)

        def emit(r, k):
            if (r, k) in emitted:
                return
            emitted.add((r, k))
            body = text(*shown(r), (r, k))
            emitted.add((r, k))
            lines.append(f"{named[r][k]} = {body}")

        net = text(seg[-1], len(self.layers) - 1, None)
        lines.append(f"network = {net}")
        if self.init:
            lines.append("init {")
            lines += [f"  {k} = {v}" for k, v in self.init.items()]
            lines.append("}")
        written = {k: v for k, v in self.train.items() if k in (self.written or ())}
        if written:
            lines.append("train {")
            lines += [f"  {k} = {fmt(v) if not isinstance(v, CallValue) else v}" for k, v in written.items()]
            lines.append("}")
        return "\n".join(lines) + "\n"

    def _layer_text(self, i):
        return self.layers[i].describe()

    def spec(self):
        """Everything that defines the model, for comparing two models."""
        return (tuple((l.name, l.spec_key(), l.in_shape, l.out, getattr(l.feed, "name", None)) for l in self.layers),
                tuple(sorted(self.aliases.items())),
                tuple((k, str(v)) for k, v in self.train.items()),
                tuple((k, str(v)) for k, v in self.init.items()))


# ------------------------------------------------------------------------------------ building
def load_model(path) -> Model:
    text = read_source(path)
    return build_text(text, str(path))


def build_text(text: str, file: str | None = None) -> Model:
    try:
        return build(parse_text(text, file))
    except FlowError as e:
        raise e.at(file, text)
    except RecursionError:
        raise FlowError("the model is nested too deeply", file) from None


def _err(msg, pos, program):
    return FlowError(msg, program.file, pos.line if pos else None, pos.column if pos else None, program.source)


def build(program: Program) -> Model:
    try:
        return _build(program)
    except FlowError as e:
        raise e.at(program.file, program.source)


def _build(program: Program) -> Model:
    bindings: dict = {}
    blocks: dict = {}
    chains = []
    for st in program.statements:
        if isinstance(st, Binding):
            if st.name in bindings:
                prev = bindings[st.name].pos
                raise _err(f"'{st.name}' is already bound (line {prev.line})", st.pos, program)
            if st.name in BLOCKS:
                raise _err(f"'{st.name}' is a block: write {st.name} {{ ... }}", st.pos, program)
            if registry.lookup(st.name, False) is not None or registry.lookup(st.name, True) is not None:
                raise _err(f"'{st.name}' is the name of a layer kind; bind the layer to another name", st.pos, program)
            bindings[st.name] = st
        elif isinstance(st, Block):
            if st.name not in BLOCKS:
                raise _err(f"unknown block '{st.name}'{did_you_mean(st.name, BLOCKS)} (blocks: train, init)",
                           st.pos, program)
            if st.name in blocks:
                raise _err(f"a second {st.name} block (the first is at line {blocks[st.name].pos.line})",
                           st.pos, program)
            blocks[st.name] = st
        else:
            chains.append(st)

    if "network" in bindings:
        if chains:
            raise _err("this chain is not bound to a name, and the file already defines `network`",
                       chains[0].pos, program)
        net_chain = bindings["network"].chain
    elif len(chains) == 1:
        net_chain = chains[0]
    elif len(chains) > 1:
        raise _err("a second unbound chain: bind the network with `network = ...` "
                   "(a file has one network)", chains[1].pos, program)
    else:
        raise _err("no network: write one chain such as `conv(28x28x1, filters=8) :: dense(10) :: softmax`, "
                   "or bind one with `network = ...`", None if not program.statements else program.statements[0].pos,
                   program) if program.statements else FlowError(
            "the file is empty: write a network such as `conv(28x28x1, filters=8) :: dense(10) :: softmax`",
            program.file, None, None, program.source)

    layers, aliases = [], {}
    used_names = {}
    expanding = []

    def expand(chain: Chain, bound_as: str | None):
        start = len(layers)
        branch = None   # a chain that starts with a name already built: its next layer reads that output
        for k, el in enumerate(chain.elements):
            if isinstance(el, Name) and el.name in bindings:
                if el.name in expanding:
                    raise _err(f"'{el.name}' refers to itself", el.pos, program)
                if el.name in used_names:
                    if k == 0 and len(chain.elements) > 1:
                        branch = el
                        continue
                    raise _err(f"'{el.name}' is used twice (first at {used_names[el.name].line}:{used_names[el.name].column}); "
                               f"layers do not share weights: define a second layer, or start a branch from its "
                               f"output with `x = {el.name} :: ...`", el.pos, program)
                used_names[el.name] = el.pos
                expanding.append(el.name)
                n0 = len(layers)
                expand(bindings[el.name].chain, el.name)
                expanding.pop()
                if branch is not None:   # `b = stem :: c3` with c3 bound: c3 reads stem's output
                    first = layers[n0]
                    if first.feed_name is not None or getattr(first, "starts_chain", False):
                        raise _err(f"'{el.name}' starts with a branch or a join of its own, so it cannot follow "
                                   f"'{branch.name}' here", el.pos, program)
                    first.feed_name, first.feed_pos = branch.name, branch.pos
                    branch = None
                continue
            if isinstance(el, Call) and el.name in bindings:
                raise _err(f"'{el.name}' is a bound layer, not a kind: write {el.name} without arguments",
                           el.pos, program)
            layer = _make_layer(el, program, bindings)
            if branch is not None:
                layer.feed_name, layer.feed_pos = branch.name, branch.pos
                branch = None
            elif k == 0 and getattr(layer, "starts_chain", None) is not None:
                # concat(a, b, ...) first in a chain joins the named branches only; those not built
                # yet are built here, in the order named
                layer.starts_chain = True
                for ref in _refs(layer):
                    if ref in bindings and ref not in used_names and ref not in expanding:
                        used_names[ref] = layer.where.get("from", el.pos)
                        expanding.append(ref)
                        expand(bindings[ref].chain, ref)
                        expanding.pop()
            layers.append(layer)
        if branch is not None:   # unreachable: a one-element chain of a used name is an error above
            raise _err(f"'{branch.name}' is used twice", branch.pos, program)
        end = len(layers) - 1
        if bound_as is not None:
            if end < start:
                raise _err(f"'{bound_as}' is empty", chain.pos, program)
            if end == start and layers[start].name is None:
                layers[start].name = bound_as
                layers[start].auto_name = False
            else:
                aliases[bound_as] = (start, end)

    expand(net_chain, None)
    if "network" in bindings:
        aliases.pop("network", None)

    # automatic names: kind + running number, skipping names the user bound
    taken = set(bindings) | {l.name for l in layers if l.name}
    counts = {}
    for l in layers:
        if l.name is None:
            while True:
                counts[l.kind] = counts.get(l.kind, 0) + 1
                cand = f"{l.kind}{counts[l.kind]}"
                if cand not in taken:
                    break
            l.name, l.auto_name = cand, True
            taken.add(cand)

    _resolve_refs(layers, aliases, program, set(bindings))
    _resolve_feeds(layers, aliases, program)

    # input shape
    first = layers[0]
    body = layers
    if first.role == "input":
        shape = from_written(first.args["shape"])
    elif first.args.get("shape") is not None:
        shape = from_written(first.args["shape"])
    elif any(p.name == "shape" for p in first.params):
        raise _err(f"the first layer needs the input shape, e.g. {first.kind}(28x28x1, ...), "
                   f"or start the network with input(28x28x1)", first.pos, program)
    else:
        raise _err(f"the network needs its input shape: start it with input(28x28x1) "
                   f"(or input(784) for vectors)", first.pos, program)
    _check_shape_dims(first, program)
    for l in layers[1:]:
        if l.role == "input":
            raise _err("input(...) may only start the network", l.pos, program)
        if l.args.get("shape") is not None:
            raise _err(f"only the first layer takes the input shape; {l.name} infers its own",
                       l.where.get("shape", l.pos), program)

    # losses: exactly one, at the end
    for l in layers[:-1]:
        if l.role == "loss":
            raise _err(f"{l.kind} is a loss: it may only end the network", l.pos, program)
    if layers[-1].role != "loss":
        raise _err("the network must end with a loss: add `:: softmax` (classification) or "
                   "`:: squared` (regression)", layers[-1].pos, program)

    # shape inference
    s = shape
    for l in body:
        if l.feed is not None:    # a branch, or a concat that starts a chain
            s = l.feed.out
        l.in_shape = s
        try:
            s = tuple(l.out_shape(s))
        except LayerError as e:
            pos = l.where.get(e.key, l.pos) if e.key else l.pos
            raise _err(f"{l.kind} {l.name}: {e}", pos, program) from None
        l.out = s
    _check_every_output_used(layers, aliases, program)

    train, written = _train_settings(blocks.get("train"), program)
    if train.get("augment"):
        # augmentations that cannot apply to this input (hflip on vectors, a cutout larger than
        # the image) are errors here, so `flowdsl check` reports them before a run starts
        from .augment import Augmenter
        try:
            Augmenter(train["augment"]).check(shape)
        except FlowError as e:
            st = next(s for s in blocks["train"].settings if s.key == "augment")
            raise _err(e.message, st.pos, program) from None
    init = _init_settings(blocks.get("init"), program, layers, aliases)
    return Model(layers, aliases, train, init, program.source, program.file, written)


def _refs(layer):
    """The layer names a layer's arguments hold (add's from=, concat's branches)."""
    out = []
    for p in layer.params:
        if p.kind == "layer":
            v = layer.args[p.name]
            out += list(v) if isinstance(v, tuple) else [v]
    return out


def _find(ref, i, l, what, pos, layers, aliases, program, bound=()):
    """The index of the layer a name refers to (a layer's own name, or a sub-chain's last
    layer), which must come before layer i."""
    index = {m.name: j for j, m in enumerate(layers)}
    j = index.get(ref, aliases[ref][1] if ref in aliases else None)
    if j is None and ref in bound:
        raise _err(f"{l.kind} {l.name}: '{ref}' is not built before this layer (no chain uses it yet). A "
                   f"concat first in a chain builds the branches it names: write concat(..., {ref}) at the start "
                   f"of a chain, or use {ref} in a chain before this one", pos, program)
    if j is None:
        earlier = [m.name for m in layers[:i]] + [a for a, (_, e) in aliases.items() if e < i]
        raise _err(f"{l.kind} {l.name}: no layer named '{ref}'{did_you_mean(ref, earlier)}", pos, program)
    if j >= i:
        how = ("is this layer itself" if ref == l.name else "contains this layer" if
               ref in aliases and aliases[ref][0] <= i else "comes after it")
        raise _err(f"{l.kind} {l.name}: '{ref}' {how}; {what} names an earlier layer", pos, program)
    return j


def _resolve_refs(layers, aliases, program, bound=()):
    """Point each layer argument that names another layer (add(from=stem), concat(a, b)) at that
    layer: a layer's own name or a sub-chain's name (its last layer), which must come earlier."""
    for i, l in enumerate(layers):
        for p in l.params:
            if p.kind != "layer":
                continue
            refs = l.args[p.name]
            pos = l.where.get(p.name, l.pos)
            # the layers named, in order: what the layer's inputs() reads besides its input
            l.srcs = [layers[_find(r, i, l, f"{p.name}=", pos, layers, aliases, program, bound)]
                      for r in (refs if isinstance(refs, tuple) else (refs,))]


def _resolve_feeds(layers, aliases, program):
    """A branch's first layer reads the output of the name its chain starts with; a concat that
    starts a chain reads its first branch (and joins the others)."""
    for i, l in enumerate(layers):
        if l.feed_name is not None:
            l.feed = layers[_find(l.feed_name, i, l, "a branch", l.feed_pos, layers, aliases, program)]
        elif getattr(l, "starts_chain", False):
            if not getattr(l, "srcs", None):   # add(from=[]) first in a chain: nothing to read
                raise _err(f"{l.kind} starts a chain, so it needs the names of the layers it joins, "
                           f"e.g. {l.kind}(a, b). Received: none", l.pos, program)
            l.feed = l.srcs[0]


def _check_every_output_used(layers, aliases, program):
    """Every layer's output goes somewhere: to the next layer, or to a layer that names it. A
    branch that nothing joins would be computed for nothing (and learn nothing)."""
    used = set()
    for i, l in enumerate(layers):
        if l.feed is not None:
            used.add(id(l.feed))
        elif i:
            used.add(id(layers[i - 1]))
        used.update(id(m) for m in l.inputs())
    for i, l in enumerate(layers[:-1]):
        if id(l) not in used:
            names = [a for a, (_, e) in aliases.items() if e == i] or [l.name]
            raise _err(f"the output of {names[0]} ({l.kind}) is not used: the next layer starts a branch "
                       f"from another one. Join it with concat({names[0]}, ...) or add({names[0]}), or remove it",
                       l.pos, program)


def _check_shape_dims(first, program):
    dims = first.args["shape"]
    if len(dims) not in (1, 3):
        raise _err(f"an input shape is WxHxC (e.g. 28x28x1) or a vector size N. Received: {dims.text}",
                   first.where.get("shape", first.pos), program)


def _make_layer(el, program, bindings):
    if isinstance(el, Name):
        name, args, has_args = el.name, (), False
    else:
        name, args, has_args = el.name, el.args, bool(el.args)
    cls = registry.lookup(name, has_args)
    if cls is None:
        raise _err(f"unknown layer '{name}'{did_you_mean(name, registry.all_names() | set(bindings))}",
                   el.pos, program)
    where = {}
    kind = cls.kind
    values = bind(kind, cls.params, args, el.pos, where=where)
    # normalise activation aliases in act=
    if isinstance(values.get("act"), CallValue):
        a = values["act"]
        acls = registry.lookup(a.name, False)
        values["act"] = CallValue(acls.kind, a.args)
    try:
        layer = cls(values, None, el.pos, where)
    except LayerError as e:
        pos = where.get(e.key, el.pos) if e.key else el.pos
        raise _err(f"{kind}: {e}", pos, program) from None
    layer.auto_name = True
    return layer


def _train_settings(block, program):
    settings = {}
    written = {}   # key -> position of its setting
    if block is not None:
        from .parse import Arg
        args = []
        for st in block.settings:
            if st.key in written:
                raise _err(f"train: '{st.key}' is set twice", st.pos, program)
            written[st.key] = st.pos
            args.append(Arg(st.key, st.value, st.pos))
        settings = bind("train", TRAIN, args, block.pos)
        if settings["epochs"] is not None and settings["iterations"] is not None:
            st = next(s for s in block.settings if s.key == "iterations")
            raise _err("train: set epochs or iterations, not both", st.pos, program)
    else:
        settings = bind("train", TRAIN, (), None)
    return settings, written


def _init_settings(block, program, layers, aliases):
    if block is None:
        return {}
    out = {}
    names = {l.name: l for l in layers}
    for st in block.settings:
        if st.key in out:
            raise _err(f"init: '{st.key}' is set twice", st.pos, program)
        if st.key != "default":
            if st.key in names:
                target = names[st.key]
            elif st.key in aliases:
                i, j = aliases[st.key]
                target = None
                if not any(l.has_weights for l in layers[i:j + 1]):
                    raise _err(f"init: {st.key} ({' :: '.join(l.kind for l in layers[i:j + 1])}) "
                               f"has no weights to initialise", st.pos, program)
            else:
                raise _err(f"init: no layer named '{st.key}'{did_you_mean(st.key, list(names) + list(aliases))}",
                           st.pos, program)
            if target is not None and not target.has_weights:
                raise _err(f"init: {target.kind} {st.key} has no weights to initialise", st.pos, program)
        out[st.key] = bind_call(st.value, INITS, "initialiser")
        _check_fixed(out[st.key], st, names.get(st.key), program)
    return out


def _check_fixed(init, st, target, program):
    """Fixed filters (kirsch, sobel) fill one layer's (3, 3, C, K) filters: K must match."""
    from .init import fixed_filters
    k3 = fixed_filters(init.name)
    if k3 is None:
        return
    w = target.param_shapes(target.in_shape).get("w") if target is not None and target.spatial_filters else None
    k = k3.shape[-1]
    if w is None:
        what = "every layer" if st.key == "default" else f"'{st.key}'"
        raise _err(f"init: {init.name} fills the filters of one conv layer with field=3 and filters={k}; "
                   f"it cannot initialise {what}", st.pos, program)
    if tuple(w[:2]) != (3, 3) or w[3] != k:
        raise _err(f"init: {init.name} gives {k} filters of 3x3; {target.kind} {st.key} has "
                   f"filters={w[3]}, field={w[0]}. Write {target.kind}(filters={k}, field=3, ...)", st.pos, program)
