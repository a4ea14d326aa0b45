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
                out.append(f"{a} = {' :: '.join(l.name for l in self.layers[i:j + 1])}")
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

        def text(lo, hi, outer):
            # outer: (span, index) of the name being defined, or None for the network
            parts, i = [], lo
            while i <= hi:
                # the longest named span starting at i, using its outermost name; for the span
                # being defined, the name just inside it
                best = None
                for r, names in named.items():
                    if r[0] != i or r[1] > hi:
                        continue
                    k = len(names) - 1
                    if outer is not None and r == outer[0]:
                        k = outer[1] - 1
                        if k < 0:
                            continue
                    if best is None or r[1] > best[0][1]:
                        best = (r, k)
                if best is not None:
                    emit(*best)
                    parts.append(named[best[0]][best[1]])
                    i = best[0][1] + 1
                else:
                    parts.append(self._layer_text(i))
                    i += 1
            one = " :: ".join(parts)
            return one if len(one) < 90 else "\n    :: ".join(parts)

        def emit(r, k):
            if (r, k) in emitted:
                return
            body = text(r[0], r[1], (r, k))
            emitted.add((r, k))
            lines.append(f"{named[r][k]} = {body}")

        net = text(0, len(self.layers) - 1, None)
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
        return (tuple((l.name, l.spec_key(), l.in_shape, l.out) for l in self.layers),
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
        for el in chain.elements:
            if isinstance(el, Name) and el.name in bindings:
                if el.name in expanding:
                    raise _err(f"'{el.name}' refers to itself", el.pos, program)
                if el.name in used_names:
                    raise _err(f"'{el.name}' is used twice (first at {used_names[el.name].line}:{used_names[el.name].column}); "
                               f"layers do not share weights: define a second layer", el.pos, program)
                used_names[el.name] = el.pos
                expanding.append(el.name)
                expand(bindings[el.name].chain, el.name)
                expanding.pop()
                continue
            if isinstance(el, Call) and el.name in bindings:
                raise _err(f"'{el.name}' is a bound layer, not a kind: write {el.name} without arguments",
                           el.pos, program)
            layers.append(_make_layer(el, program, bindings))
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

    _resolve_refs(layers, aliases, program)

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
        l.in_shape = s
        try:
            s = tuple(l.out_shape(s))
        except LayerError as e:
            pos = l.where.get(e.key, l.pos) if e.key else l.pos
            raise _err(f"{l.kind} {l.name}: {e}", pos, program) from None
        l.out = s

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


def _resolve_refs(layers, aliases, program):
    """Point each layer argument that names another layer (add(from=stem)) at that layer: a
    layer's own name or a sub-chain's name (its last layer), which must come earlier."""
    index = {l.name: i for i, l in enumerate(layers)}
    for i, l in enumerate(layers):
        for p in l.params:
            if p.kind != "layer":
                continue
            ref = l.args[p.name]
            pos = l.where.get(p.name, l.pos)
            j = index.get(ref, aliases[ref][1] if ref in aliases else None)
            if j is None:
                earlier = [m.name for m in layers[:i]] + [a for a, (_, e) in aliases.items() if e < i]
                raise _err(f"{l.kind} {l.name}: no layer named '{ref}'{did_you_mean(ref, earlier)}", pos, program)
            if j >= i:
                what = ("is this layer itself" if ref == l.name else "contains this layer" if
                        ref in aliases and aliases[ref][0] <= i else "comes after it")
                raise _err(f"{l.kind} {l.name}: '{ref}' {what}; {p.name}= names an earlier layer", pos, program)
            l.src = layers[j]


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
    return out
