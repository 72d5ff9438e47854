"""A small reader of compiled HLO text (`jax.jit(f).lower(...).compile().as_text()`):
computations, and their instructions by op kind, operands and called computations.

It reads only the grammar of an instruction (`name = type opcode(operands), attributes`),
never the names XLA or JAX give to instructions and parameters, so that what a test
counts does not move when a JAX release renames things.
"""

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    opcode: str
    operands: tuple[str, ...]  # instruction names, in order
    calls: tuple[str, ...]  # computations it names (a fusion's kernel, a loop's body, ...)
    number: int | None  # a `parameter(k)`'s k
    text: str  # what follows `=`, without metadata


@dataclasses.dataclass(frozen=True)
class Module:
    computations: dict[str, tuple[Instruction, ...]]
    entry: str

    def instructions(self, computation: str | None = None) -> tuple[Instruction, ...]:
        """The entry's instructions, or `computation`'s."""
        return self.computations[self.entry if computation is None else computation]

    def count(self, opcode: str, computation: str | None = None) -> int:
        """How many `opcode` instructions: in one computation, or in all of them (with
        `computation="*"`)."""
        if computation == "*":
            return sum(self.count(opcode, c) for c in self.computations)
        return sum(i.opcode == opcode for i in self.instructions(computation))

    def size(self) -> int:
        """Every instruction of every computation."""
        return sum(len(c) for c in self.computations.values())

    def kernel(self, fusion: Instruction) -> tuple:
        """A fusion's computation with the names replaced by positions: two fusions with
        the same kernel are one kernel to compile, whatever buffers they read."""
        (called,) = [c for c in fusion.calls if c in self.computations]
        body = self.computations[called]
        position = {i.name: str(k) for k, i in enumerate(body)}
        return tuple(
            re.sub(r"%([\w.-]+)", lambda m: "%" + position.get(m.group(1), ""), i.text)
            for i in body
        )

    def source(self, name: str, computation: str | None = None) -> Instruction:
        """The instruction `name` stands for, seen through bitcasts and copies."""
        by_name = {i.name: i for i in self.instructions(computation)}
        instruction = by_name[name]
        while instruction.opcode in ("bitcast", "copy") and len(instruction.operands) == 1:
            instruction = by_name[instruction.operands[0]]
        return instruction


_HEADER = re.compile(r"^(ENTRY )?%?([\w.-]+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%?([\w.-]+) = (.*)$")
_OPCODE = re.compile(r"(?:^|\s)([a-z][a-z0-9-]*)\(")


def _matching(text: str, start: int, opening: str = "(", closing: str = ")") -> int:
    """The index of the bracket that closes the one at `start`."""
    depth = 0
    for k in range(start, len(text)):
        depth += (text[k] == opening) - (text[k] == closing)
        if depth == 0:
            return k
    raise ValueError(f"unbalanced {opening!r} in {text!r}")


def _without_metadata(text: str) -> str:
    while (start := text.find(", metadata={")) >= 0:
        end = _matching(text, text.index("{", start), "{", "}")
        text = text[:start] + text[end + 1 :]
    return text


def _instruction(name: str, rhs: str) -> Instruction:
    rhs = _without_metadata(rhs)
    opcode = _OPCODE.search(rhs)
    if opcode is None:
        raise ValueError(f"no opcode in {rhs!r}")
    start = opcode.end() - 1
    end = _matching(rhs, start)
    inside, after = rhs[start + 1 : end], rhs[end + 1 :]
    number = int(inside) if opcode.group(1) == "parameter" else None
    return Instruction(
        name=name,
        opcode=opcode.group(1),
        operands=tuple(re.findall(r"%([\w.-]+)", inside)),
        calls=tuple(re.findall(r"%([\w.-]+)", after)),
        number=number,
        text=rhs,
    )


def parse(text: str) -> Module:
    computations: dict[str, tuple[Instruction, ...]] = {}
    entry = None
    name, body = None, []
    for line in text.splitlines():
        if name is None:
            header = _HEADER.match(line)
            if header:
                name, body = header.group(2), []
                entry = name if header.group(1) else entry
        elif line.startswith("}"):
            computations[name] = tuple(body)
            name = None
        elif instruction := _INSTRUCTION.match(line):
            body.append(_instruction(*instruction.groups()))
    if entry is None:
        raise ValueError("no ENTRY computation")
    return Module(computations, entry)


def compiled(function, *args) -> Module:
    """The optimised module of `function` (a jitted function) on `args`."""
    return parse(function.lower(*args).compile().as_text())
