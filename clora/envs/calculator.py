"""A safe arithmetic evaluator for the Calculator tool.

The expression is parsed with ``ast`` and walked by hand: only number literals, ``+ - * /``,
parentheses and unary ``+``/``-`` are allowed. Names, attribute access, calls, subscripts,
powers and everything else are refused before anything is evaluated. Arithmetic is exact
(``fractions.Fraction``) and every intermediate value is bounded, so no input can allocate
huge numbers or run for long.
"""

from __future__ import annotations

import ast
import math
import re
from fractions import Fraction

__all__ = ["CalculatorError", "evaluate", "format_number", "MAX_EXPRESSION_CHARS", "MAX_MAGNITUDE"]

MAX_EXPRESSION_CHARS = 200
MAX_MAGNITUDE = 10**15  # bigger intermediate or final values are refused
_MAX_DENOMINATOR = 10**12

_BINARY_OPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: None,  # handled separately: division by zero is an error message, not an exception
}


class CalculatorError(ValueError):
    """The expression is not allowed or cannot be computed; the message is shown to the model."""


def _normalize(expression: str) -> str:
    text = expression.strip()
    text = text.replace("×", "*").replace("÷", "/").replace("−", "-")
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)  # 1,000 -> 1000
    text = text.replace("$", "")
    return text.split("=", 1)[0].strip()  # "2*6 = 12": the model wrote an equation; compute its left side


def _bounded(value: Fraction) -> Fraction:
    if abs(value) > MAX_MAGNITUDE:
        raise CalculatorError("number too large")
    if value.denominator > _MAX_DENOMINATOR:
        value = value.limit_denominator(_MAX_DENOMINATOR)
    return value


def _eval(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CalculatorError(f"not a number: {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise CalculatorError("number too large")
        return _bounded(Fraction(value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = _eval(node.operand)
        return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Div):
            if right == 0:
                raise CalculatorError("division by zero")
            return _bounded(left / right)
        return _bounded(_BINARY_OPS[type(node.op)](left, right))
    if isinstance(node, ast.BinOp):
        raise CalculatorError(f"operator {type(node.op).__name__} is not allowed (use + - * /)")
    raise CalculatorError(f"{type(node).__name__} is not allowed (use numbers, + - * / and parentheses)")


def evaluate(expression: str) -> Fraction:
    """The exact value of an arithmetic expression, or ``CalculatorError`` with a short reason."""
    if not isinstance(expression, str):
        raise CalculatorError("expression must be text")
    text = _normalize(expression)
    if not text:
        raise CalculatorError("empty expression")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise CalculatorError("cannot parse the expression") from None
    try:
        return _eval(tree)
    except RecursionError:
        raise CalculatorError("expression nested too deeply") from None


def format_number(value: Fraction | float | int) -> str:
    """Canonical text of a number: ``'84'``, ``'2.5'``, ``'0.3333333333'`` (at most 10 decimals)."""
    value = Fraction(value)
    if value.denominator == 1:
        return str(value.numerator)
    text = f"{float(value):.10f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text
