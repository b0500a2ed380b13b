"""The fast path of `--js`: a strict subset of JavaScript expressions compiled to Python closures.

A call into V8 (mini-racer) costs a few hundred microseconds even for `true`; most rules are plain
comparisons of request fields. `compile_rule` turns such a rule into a Python function that gives
exactly what the V8 path gives to `answer.parse_value` (the value after JSON.stringify/JSON.parse:
undefined is None, integral numbers are ints). Any text not entirely inside the subset gives None,
and the engine uses V8 as before. A request the subset cannot model exactly (a string with a
surrogate, non-ASCII text to lower-case, a method called on undefined, which throws in V8) raises
`Fallback`: the engine asks V8 for that one request.

The subset (whitespace, `//` and `/* */` comments allowed; one trailing `;`):
    literals       'str' "str" (escapes \\\\ \\' \\" \\n \\t \\r only), 12 1.5 1e3, true, false, null, undefined
    the request    r.method r.scheme r.host r.port r.path r.query r.url r.requester_ip r.client (also r['host'])
                   r.headers['name'] r.headers.name        a string or undefined
    strings        s.length  s.startsWith(t) s.endsWith(t) s.includes(t)  s.toLowerCase() s.toUpperCase()
                   s + t (both strings)                    t: an expression that is always a string
    arrays         [literal, ...].includes(x)              only as the receiver of includes
    operators      ! typeof  === !==  == != (same primitive type on both sides, or against null/undefined)
                   < <= > >= + (numbers)  && || (the deciding operand)  a ? b : c  ( )
Every accepted text is a valid JavaScript expression (statement, with the `;`) with the same meaning.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

__all__ = ["UNDEFINED", "Fallback", "compile_rule", "json_value"]


class Fallback(Exception):
    """This request must be decided by V8: the subset cannot give V8's answer for it exactly."""


class _Undefined:
    """JavaScript's undefined, distinct from null (None). Falsy, like every JS falsy value here."""

    __slots__ = ()

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "undefined"


UNDEFINED = _Undefined()


class Unsupported(Exception):
    """The rule text is outside the subset (or not JavaScript at all): V8 must run it."""


# Values: str (a string), float (a number: every number is a double, as in JS), bool, None (null),
# UNDEFINED. No operation of the subset can make NaN. Python truthiness then equals JS truthiness.
STRING, NUMBER, BOOLEAN, NULL, UNDEF = "string", "number", "boolean", "null", "undefined"
Types = frozenset[str]
JsFunction = Callable[[dict[str, Any]], Any]

STRING_FIELDS = ("method", "scheme", "host", "path", "query", "url", "requester_ip", "client")
# Names every object created by JSON.parse inherits: `r.headers.constructor` is a function, not undefined.
OBJECT_PROTOTYPE_NAMES = frozenset(
    [
        "constructor",
        "__defineGetter__",
        "__defineSetter__",
        "hasOwnProperty",
        "__lookupGetter__",
        "__lookupSetter__",
        "isPrototypeOf",
        "propertyIsEnumerable",
        "toString",
        "valueOf",
        "__proto__",
        "toLocaleString",
    ]
)
STRING_METHODS = {"startsWith": 1, "endsWith": 1, "includes": 1, "toLowerCase": 0, "toUpperCase": 0}

# ------------------------------------------------------------------------------------------ tokens

# Every JavaScript punctuator, longest first, so that `===` is never read as `==` `=`; only some are in the subset.
PUNCTUATORS = sorted(
    "{ } ( ) [ ] . ... ; , < > <= >= == != === !== + - * % ** ++ -- << >> >>> & | ^ ! ~ && || ?? ? ?. : = += -="  # noqa: SIM905
    " *= %= **= <<= >>= >>>= &= |= ^= &&= ||= ??= => / /=".split(),
    key=len,
    reverse=True,
)
SUPPORTED_PUNCTUATORS = frozenset("( ) [ ] . , ; < > <= >= == != === !== + ! && || ? :".split())  # noqa: SIM905
STRING_ESCAPES = {"\\": "\\", "'": "'", '"': '"', "n": "\n", "t": "\t", "r": "\r"}
NUMBER = re.compile(r"(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
NAME = re.compile(r"[A-Za-z_$][A-Za-z0-9_$]*")
# Characters after a number that JS would read as part of it, or reject (`1x`, `1_0`, `0x1`, `01`, `1.`).
AFTER_NUMBER = re.compile(r"[A-Za-z0-9_$.\\]|[^\x00-\x7f]")
# Surrogate code points: a Python str may hold them (surrogateescape), and two of them are one JS character.
SURROGATES = re.compile("[\ud800-\udfff]")
# In rule text, also the line terminators U+2028/U+2029, which end a `//` comment in JS.
UNSAFE_CHARS = re.compile("[\ud800-\udfff\u2028\u2029]")


def tokenize(code: str) -> list[tuple[str, Any]]:
    """(kind, value) pairs: ("str", text), ("num", float), ("name", text), ("punct", text), ("end", None)."""
    if UNSAFE_CHARS.search(code):
        raise Unsupported("surrogate or U+2028/U+2029 in the text")
    tokens: list[tuple[str, Any]] = []
    at, end = 0, len(code)
    while at < end:
        char = code[at]
        if char in " \t\n\r":
            at += 1
        elif code.startswith("//", at):
            while at < end and code[at] not in "\n\r":
                at += 1
        elif code.startswith("/*", at):
            close = code.find("*/", at + 2)
            if close < 0:
                raise Unsupported("unterminated comment")
            at = close + 2
        elif char in "'\"":
            text, at = _string(code, at)
            tokens.append(("str", text))
        elif match := NUMBER.match(code, at):
            at = match.end()
            if AFTER_NUMBER.match(code, at):
                raise Unsupported("number form outside the subset")
            tokens.append(("num", float(match.group())))
        elif match := NAME.match(code, at):
            at = match.end()
            tokens.append(("name", match.group()))
        else:
            punct = next((p for p in PUNCTUATORS if code.startswith(p, at)), None)
            if punct not in SUPPORTED_PUNCTUATORS:
                raise Unsupported(f"character {char!r} outside the subset")
            if punct == "." and at + 1 < end and code[at + 1].isdigit():
                raise Unsupported("number form outside the subset")
            at += len(punct)
            tokens.append(("punct", punct))
    tokens.append(("end", None))
    return tokens


def _string(code: str, at: int) -> tuple[str, int]:
    quote, at, parts = code[at], at + 1, []
    while at < len(code):
        char = code[at]
        if char == quote:
            return "".join(parts), at + 1
        if char == "\\":
            escaped = code[at + 1 : at + 2]
            if escaped not in STRING_ESCAPES:
                raise Unsupported("string escape outside the subset")
            parts.append(STRING_ESCAPES[escaped])
            at += 2
            continue
        if char < " " and char != "\t":
            raise Unsupported("line break or control character in a string")
        parts.append(char)
        at += 1
    raise Unsupported("unterminated string")


# ------------------------------------------------------------------------------------------ runtime


def _clean(text: str) -> bool:
    """True if JS sees the same string: no surrogate code points (two of them would be one JS character)."""
    return text.isascii() or not SURROGATES.search(text)


def _string_field(name: str) -> JsFunction:
    def get(request: dict[str, Any]) -> str:
        value = request[name]
        if value.__class__ is str and (value.isascii() or _clean(value)):
            return value
        raise Fallback

    return get


def _port(request: dict[str, Any]) -> float:
    value = request["port"]
    if value.__class__ is int and -(2**53) <= value <= 2**53:
        return float(value)
    raise Fallback


def _header(name: str) -> JsFunction:
    def get(request: dict[str, Any]) -> Any:
        headers = request["headers"]
        if headers.__class__ is not dict:
            raise Fallback
        value = headers.get(name, UNDEFINED)
        if value is UNDEFINED or (value.__class__ is str and (value.isascii() or _clean(value))):
            return value
        raise Fallback

    return get


def _utf16_length(text: str) -> float:
    return float(len(text) if text.isascii() else len(text.encode("utf-16-le")) // 2)


def _strict_equal(a: Any, b: Any) -> bool:
    return a.__class__ is b.__class__ and a == b


def _typeof(value: Any) -> str:
    return TYPEOF[value.__class__]


TYPEOF = {str: "string", float: "number", bool: "boolean", type(None): "object", _Undefined: "undefined"}


def json_value(value: Any) -> Any:
    """The value as the V8 path decodes it: JSON.stringify({value}) read back by json.loads, then .get."""
    if value.__class__ is float:
        if not math.isfinite(value):
            return None
        return int(value) if value.is_integer() and abs(value) < 1e21 else value
    return None if value is UNDEFINED else value


# ------------------------------------------------------------------------------------------ parser


class Node:
    """A parsed (and already compiled) piece of the rule. kind: "value" (fn gives a JS value of one of
    `types`), "r" (the request), "headers" (r.headers), "array" (a literal array, items in `data`),
    "method" (a method looked up on a value, waiting for its call: data is (receiver, name))."""

    __slots__ = ("const", "data", "fn", "kind", "types")

    def __init__(self, kind: str, types: Types = frozenset(), fn: Any = None, data: Any = None) -> None:
        self.kind, self.types, self.fn, self.data = kind, types, fn, data
        self.const = False


def _constant(value: Any, type_: str) -> Node:
    node = Node("value", frozenset({type_}), lambda request: value, value)
    node.const = True
    return node


TRUTHY_TYPES = frozenset({STRING, NUMBER, BOOLEAN})


class Parser:
    def __init__(self, tokens: list[tuple[str, Any]]) -> None:
        self.tokens = tokens
        self.at = 0

    def peek(self) -> tuple[str, Any]:
        return self.tokens[self.at]

    def take(self) -> tuple[str, Any]:
        token = self.tokens[self.at]
        self.at += 1
        return token

    def accept(self, punct: str) -> bool:
        if self.tokens[self.at] == ("punct", punct):
            self.at += 1
            return True
        return False

    def expect(self, punct: str) -> None:
        if not self.accept(punct):
            raise Unsupported(f"expected {punct!r}")

    def rule(self) -> Node:
        node = self.value(self.conditional())
        self.accept(";")
        if self.peek()[0] != "end":
            raise Unsupported("more than one expression")
        return node

    @staticmethod
    def value(node: Node) -> Node:
        if node.kind != "value":
            raise Unsupported(f"{node.kind} used as a value")
        return node

    def conditional(self) -> Node:
        test = self.logical_or()
        if not self.accept("?"):
            return test
        test = self.value(test)
        then = self.value(self.conditional())
        self.expect(":")
        other = self.value(self.conditional())
        t, a, b = test.fn, then.fn, other.fn
        return Node("value", then.types | other.types, lambda r: a(r) if t(r) else b(r))

    def logical_or(self) -> Node:
        operands = [self.logical_and()]
        while self.accept("||"):
            operands.append(self.value(self.logical_and()))
        if len(operands) == 1:
            return operands[0]
        self.value(operands[0])
        # a || b is a when a is truthy, else b: the types of the first ones that can be truthy, and the last's.
        types = frozenset().union(*(node.types & TRUTHY_TYPES for node in operands[:-1]), operands[-1].types)
        *firsts, last_fn = (node.fn for node in operands)

        def either(request: dict[str, Any]) -> Any:
            for fn in firsts:
                value = fn(request)
                if value:
                    return value
            return last_fn(request)

        return Node("value", types, either)

    def logical_and(self) -> Node:
        operands = [self.equality()]
        while self.accept("&&"):
            operands.append(self.value(self.equality()))
        if len(operands) == 1:
            return operands[0]
        self.value(operands[0])
        types = frozenset().union(*(node.types for node in operands))
        *firsts, last_fn = (node.fn for node in operands)

        def both(request: dict[str, Any]) -> Any:
            for fn in firsts:
                value = fn(request)
                if not value:
                    return value
            return last_fn(request)

        return Node("value", types, both)

    def equality(self) -> Node:
        left = self.relational()
        while (token := self.peek()) in (("punct", "==="), ("punct", "!=="), ("punct", "=="), ("punct", "!=")):
            self.take()
            left = _equality(token[1], self.value(left), self.value(self.relational()))
        return left

    def relational(self) -> Node:
        left = self.additive()
        while (token := self.peek()) in (("punct", "<"), ("punct", "<="), ("punct", ">"), ("punct", ">=")):
            self.take()
            right = self.value(self.additive())
            left = self.value(left)
            if left.types != {NUMBER} or right.types != {NUMBER}:
                raise Unsupported("comparison of non-numbers")
            left = _compare(token[1], left.fn, right.fn)
        return left

    def additive(self) -> Node:
        left = self.unary()
        while self.accept("+"):
            right = self.value(self.unary())
            left = self.value(left)
            a, b = left.fn, right.fn
            if left.types == right.types == {STRING}:
                left = Node("value", left.types, lambda r, a=a, b=b: a(r) + b(r))
            elif left.types == right.types == {NUMBER}:
                left = Node("value", left.types, _add_numbers(a, b))
            else:
                raise Unsupported("+ of anything but two strings or two numbers")
        return left

    def unary(self) -> Node:
        if self.accept("!"):
            operand = self.value(self.unary()).fn
            return Node("value", frozenset({BOOLEAN}), lambda r: not operand(r))
        if self.peek() == ("name", "typeof"):
            self.take()
            operand = self.value(self.unary()).fn
            return Node("value", frozenset({STRING}), lambda r: _typeof(operand(r)))
        return self.postfix()

    def postfix(self) -> Node:
        node = self.primary()
        while True:
            if self.accept("."):
                kind, name = self.take()
                if kind != "name":
                    raise Unsupported("expected a property name")
                node = _member(node, name, dotted=True)
            elif self.accept("["):
                kind, name = self.take()
                if kind != "str":
                    raise Unsupported("only a string literal in [ ]")
                self.expect("]")
                node = _member(node, name, dotted=False)
            elif self.accept("("):
                args = []
                if not self.accept(")"):
                    args.append(self.value(self.conditional()))
                    self.expect(")")
                node = _call(node, args)
            else:
                return node

    def primary(self) -> Node:
        kind, text = self.take()
        if kind == "str":
            return _constant(text, STRING)
        if kind == "num":
            return _constant(text, NUMBER)
        if kind == "name":
            if text == "r":
                return Node("r")
            literal = {"true": (True, BOOLEAN), "false": (False, BOOLEAN), "null": (None, NULL)}
            if text in literal:
                return _constant(*literal[text])
            if text == "undefined":
                return _constant(UNDEFINED, UNDEF)
            raise Unsupported(f"name {text!r} outside the subset")
        if (kind, text) == ("punct", "("):
            node = self.value(self.conditional())
            self.expect(")")
            return node
        if (kind, text) == ("punct", "["):
            items: list[Any] = []
            while not self.accept("]"):
                if items:
                    self.expect(",")
                item = self.primary()
                if not item.const:
                    raise Unsupported("only literals in an array")
                items.append(item.data)
            return Node("array", data=tuple(items))
        raise Unsupported(f"{text!r} outside the subset")


def _member(node: Node, name: str, dotted: bool) -> Node:
    if node.kind == "r":
        if name in STRING_FIELDS:
            return Node("value", frozenset({STRING}), _string_field(name))
        if name == "port":
            return Node("value", frozenset({NUMBER}), _port)
        if name == "headers":
            return Node("headers")
        raise Unsupported(f"r.{name} outside the subset")
    if node.kind == "headers":
        if not name.isascii() or name in OBJECT_PROTOTYPE_NAMES:
            raise Unsupported(f"header name {name!r} outside the subset")
        return Node("value", frozenset({STRING, UNDEF}), _header(name))
    if node.kind == "value" and dotted and STRING in node.types and node.types <= {STRING, NULL, UNDEF}:
        if name == "length":
            return Node("value", frozenset({NUMBER}), _length(node.fn, node.types == {STRING}))
        if name in STRING_METHODS:
            return Node("method", data=(node, name))
    if node.kind == "array" and dotted and name == "includes":
        return Node("method", data=(node, name))
    raise Unsupported(f".{name} outside the subset")


def _length(receiver: JsFunction, always_string: bool) -> JsFunction:
    if always_string:
        return lambda r: _utf16_length(receiver(r))

    def length(request: dict[str, Any]) -> float:
        value = receiver(request)
        if value.__class__ is not str:
            raise Fallback  # V8 throws a TypeError: reading a property of undefined or null
        return _utf16_length(value)

    return length


def _call(node: Node, args: list[Node]) -> Node:
    if node.kind != "method":
        raise Unsupported("call of something other than a method of the subset")
    receiver, name = node.data
    if receiver.kind == "array":
        if len(args) != 1:
            raise Unsupported("includes takes one argument here")
        return Node("value", frozenset({BOOLEAN}), _array_includes(receiver.data, args[0].fn))
    if len(args) != STRING_METHODS[name]:
        raise Unsupported(f"{name} with {len(args)} arguments")
    if args and args[0].types != {STRING}:
        raise Unsupported(f"{name} of something that may not be a string")
    get = receiver.fn
    if receiver.types != {STRING}:
        get = _must_be_string(get)
    if name in ("toLowerCase", "toUpperCase"):
        convert = str.lower if name == "toLowerCase" else str.upper

        def case(request: dict[str, Any]) -> str:
            value = get(request)
            if value.isascii():  # JS and Python map ASCII letters alike; Unicode tables may differ
                return convert(value)
            raise Fallback

        return Node("value", frozenset({STRING}), case)
    # Neither string holds a surrogate, so code-point and UTF-16 prefixes, suffixes and substrings agree.
    operation = {"startsWith": str.startswith, "endsWith": str.endswith, "includes": str.__contains__}[name]
    argument = args[0]
    if argument.const:
        text = argument.data
        return Node("value", frozenset({BOOLEAN}), lambda r: operation(get(r), text))
    arg = argument.fn
    return Node("value", frozenset({BOOLEAN}), lambda r: operation(get(r), arg(r)))


def _must_be_string(get: JsFunction) -> JsFunction:
    def string(request: dict[str, Any]) -> str:
        value = get(request)
        if value.__class__ is not str:
            raise Fallback  # V8 throws a TypeError: calling a method of undefined or null
        return value

    return string


def _array_includes(items: tuple[Any, ...], arg: JsFunction) -> JsFunction:
    # SameValueZero: the same type and value (0 and -0 are equal, as for == on floats; no NaN here).
    keys = frozenset((item.__class__, item) for item in items)
    return lambda r: ((value := arg(r)).__class__, value) in keys


def _equality(op: str, left: Node, right: Node) -> Node:
    a, b = left.fn, right.fn
    negate = op in ("!==", "!=")
    if op in ("==", "!="):
        if left.types <= {NULL, UNDEF} or right.types <= {NULL, UNDEF}:
            # x == null is true for null and undefined only (each side is evaluated, as in JS)
            def loose(r: dict[str, Any]) -> bool:
                x, y = a(r), b(r)
                return (x is None or x is UNDEFINED) and (y is None or y is UNDEFINED)

            test = loose
        elif left.types == right.types and len(left.types) == 1 and left.types <= {STRING, NUMBER, BOOLEAN}:
            test = _same_type_equal(a, b, right.const, right.data)
        else:
            raise Unsupported("== between values that may differ in type")
    elif left.types == right.types and len(left.types) == 1:
        test = _same_type_equal(a, b, right.const, right.data)
    else:
        test = lambda r: _strict_equal(a(r), b(r))  # noqa: E731
    if negate:
        positive = test
        return Node("value", frozenset({BOOLEAN}), lambda r: not positive(r))
    return Node("value", frozenset({BOOLEAN}), test)


def _same_type_equal(a: JsFunction, b: JsFunction, b_const: bool, b_value: Any) -> JsFunction:
    # Same JS type on both sides: Python's == on str, float, bool, None and UNDEFINED is JS's ===.
    if b_const:
        return lambda r: a(r) == b_value
    return lambda r: a(r) == b(r)


def _compare(op: str, a: JsFunction, b: JsFunction) -> Node:
    compare = {
        "<": lambda r: a(r) < b(r),
        "<=": lambda r: a(r) <= b(r),
        ">": lambda r: a(r) > b(r),
        ">=": lambda r: a(r) >= b(r),
    }[op]
    return Node("value", frozenset({BOOLEAN}), compare)


def _add_numbers(a: JsFunction, b: JsFunction) -> JsFunction:
    def add(request: dict[str, Any]) -> float:
        total = a(request) + b(request)
        if total != total:  # NaN (Infinity + -Infinity): never made by the subset, but never guessed either
            raise Fallback
        return total

    return add


# ------------------------------------------------------------------------------------------ entry


def compile_rule(code: str) -> Callable[[dict[str, Any]], Any] | None:
    """A function of the request dict (Request.to_dict) giving what the V8 path would give to
    answer.parse_value, or raising Fallback; None if the rule is not entirely inside the subset."""
    try:
        node = Parser(tokenize(code)).rule()
    except (Unsupported, RecursionError):
        return None
    fn = node.fn

    def rule(request: dict[str, Any]) -> Any:
        return json_value(fn(request))

    rule.__doc__ = f"subset rule: {code!r}"
    return rule
