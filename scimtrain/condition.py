"""TileDB query conditions, evaluated in numpy where TileDB cannot: numbers stored as text.

The ``cellarr`` builder writes every frame column as TileDB ``ascii`` unless told otherwise,
numeric QC columns included, and TileDB refuses ``total_counts>1000`` on such a column (a
number compared with text). :func:`plan_condition` splits a condition's top-level ``and`` into
the part TileDB evaluates (everything it can: it is faster) and the part evaluated here, on the
decoded columns with their text parsed as numbers, which selects the cells TileDB would select
on a numeric column.

The grammar is tiledb-py's ``QueryCondition``: Python expressions of comparisons
(``< <= > >= == !=``, chained ``a < x < b``, ``in``/``not in`` a list), ``and``/``or``/``not``,
``&``/``|``; columns bare or as ``attr("name")``; values as constants or ``val(...)``.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

# Column kinds, from the TileDB schema (see scimtrain.store.column_kinds).
TEXT, NUMBER, ENUM = "text", "number", "enum"
# Text that stands for a missing number (how pandas and Python print one): compares as NaN,
# as a missing value of a numeric column does in TileDB.
MISSING_TEXT = frozenset({"", "\x00", "nan", "none", "null", "na", "<na>"})
# TileDB compares a boolean column as uint8; text "True"/"False" compares the same way.
BOOLEAN_TEXT = {"true": 1.0, "false": 0.0}

_OPS: dict[type, Callable[[object, object], object]] = {
    ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Lt: operator.lt, ast.LtE: operator.le,
    ast.Eq: operator.eq, ast.NotEq: operator.ne,
}
# ``5 < x`` is read as ``x > 5``, as TileDB reads it.
_REVERSED: dict[type, type] = {ast.Gt: ast.Lt, ast.GtE: ast.LtE, ast.Lt: ast.Gt,
                               ast.LtE: ast.GtE, ast.Eq: ast.Eq, ast.NotEq: ast.NotEq}


class ConditionError(ValueError):
    """A condition part cannot be evaluated here, or a text value is not a number."""


@dataclass(frozen=True)
class ConditionPlan:
    """Where each part of a condition is evaluated.

    ``tiledb``: the condition string for TileDB (``None``: no TileDB condition).
    ``python``: the part evaluated by :meth:`evaluate` (``None``: nothing).
    ``columns``: the columns that part reads.
    """

    tiledb: str | None
    python: ast.expr | None = None
    columns: tuple[str, ...] = ()

    def evaluate(self, columns: Mapping[str, np.ndarray]) -> np.ndarray:
        """Which rows satisfy the ``python`` part.

        Args:
            columns: each of ``self.columns``, one value per row: numbers as numeric arrays,
                text as object arrays of ``str``.

        Returns:
            A boolean array, one entry per row (all True without a ``python`` part).

        Raises:
            ConditionError: a text value compared with a number is not a number.
        """
        n_rows = len(next(iter(columns.values()))) if columns else 0
        if self.python is None:
            return np.ones(n_rows, dtype=bool)
        return _Evaluator(columns).mask(self.python)


def plan_condition(condition: str | None, kinds: Mapping[str, str],
                   read: Sequence[str] = ()) -> ConditionPlan:
    """Split a TileDB condition between TileDB and :meth:`ConditionPlan.evaluate`.

    A conjunct of the top-level ``and`` is evaluated here when it compares a text column
    (``kinds[column]`` is ``TEXT`` or ``ENUM``) with a number; the rest stays with TileDB. The
    whole condition is evaluated here when a column to ``read`` is an enumeration: tiledb-py
    decodes the enumeration codes of the rows a condition filtered out (its fill value) and
    fails. A condition that does not parse goes to TileDB as it is, which says what is wrong.

    Args:
        condition: a TileDB query-condition string; ``None`` or ``""`` selects every row.
        kinds: every column of the frame and its kind: ``TEXT``, ``NUMBER`` or ``ENUM``.
        read: the columns the query returns.

    Raises:
        ConditionError: the part to evaluate here names an unknown column or uses a form
            this module does not read.
    """
    if not condition:
        return ConditionPlan(None)
    try:
        tree = ast.parse(f"({condition})", mode="eval").body
    except SyntaxError:
        return ConditionPlan(condition)
    conjuncts = list(_conjuncts(tree))
    if any(kinds.get(column) == ENUM for column in read):
        here = conjuncts
    else:
        here = [c for c in conjuncts if _compares_text_with_number(c, kinds)]
    if not here:
        return ConditionPlan(condition)
    rest = [c for c in conjuncts if not any(c is h for h in here)]
    python = here[0] if len(here) == 1 else ast.BoolOp(op=ast.And(), values=here)
    columns = _columns(python)
    unknown = [c for c in columns if c not in kinds]
    if unknown:
        raise ConditionError(f"the condition names no column of the frame: {unknown}")
    tiledb = " and ".join(f"({ast.unparse(c)})" for c in rest) or None
    return ConditionPlan(tiledb, python, columns)


def parse_numbers(values: np.ndarray, column: str) -> np.ndarray:
    """Text values as float64: numbers as written, missing text (``''``, ``'nan'``, ``'None'``,
    ...) as NaN, ``'True'``/``'False'`` as 1/0.

    Raises:
        ConditionError: a value is none of these; the message names ``column`` and the value.
    """
    # Real columns repeat few distinct values (counts, flags): parse each one once.
    codes, uniques = pd.factorize(np.asarray(values, dtype=object), use_na_sentinel=False)
    uniques = np.asarray(uniques, dtype=object)
    try:
        parsed = uniques.astype(np.float64)
    except (TypeError, ValueError):
        parsed = np.array([_number(u, column) for u in uniques], dtype=np.float64)
    return parsed[codes]


def _number(value: object, column: str) -> float:
    text = value.decode() if isinstance(value, bytes) else str(value)
    word = text.strip().lower()
    if word in MISSING_TEXT:
        return float("nan")
    if word in BOOLEAN_TEXT:
        return BOOLEAN_TEXT[word]
    try:
        return float(text)
    except ValueError:
        raise ConditionError(
            f"column '{column}' is stored as text and holds {text!r}, which is not a number, "
            "so it cannot be compared with a number; correct the value in the store, or "
            "compare the column with text (quoted)") from None


def scimilarity_clauses(label_column: str, *, missing_label: str = "nan",
                        total_counts: str = "total_counts",
                        genes_detected: str = "n_genes_by_counts",
                        mito_share: str = "pct_counts_mt",
                        doublets: str = "predicted_doublets") -> list[str]:
    """The clauses of SCimilarity's default cell filter (docs/scimilarity.md §2.1) in a
    source's column names: labelled, > 1,000 counts, > 500 genes, < 20 % mitochondrial, no
    doublet, and not CL:0009010."""
    return [f"{label_column}!='{missing_label}'", f"{total_counts}>1000",
            f"{genes_detected}>500", f"{mito_share}<20", f"{doublets}==0",
            f"{label_column}!='CL:0009010'"]


def scimilarity_filter(label_column: str) -> str:
    """SCimilarity's default cell filter on ``label_column``, as one condition."""
    return " and ".join(scimilarity_clauses(label_column))


def clause_columns(clause: str) -> tuple[str, ...]:
    """The columns one condition (or clause) reads; raises :class:`ConditionError` when it
    is not a form read here."""
    try:
        tree = ast.parse(clause.strip(), mode="eval").body
    except SyntaxError as exc:
        raise ConditionError(f"cannot parse {clause!r}: {exc.msg}") from None
    return _columns(tree)


def split_clauses(condition: str) -> list[str]:
    """The top-level ``and`` clauses of a condition, as condition strings (e.g. to count
    what each clause keeps when the whole condition keeps nothing)."""
    try:
        tree = ast.parse(condition.strip(), mode="eval").body
    except SyntaxError:
        return [condition]
    return [ast.unparse(node) for node in _conjuncts(tree)]


# --------------------------------------------------------------------------- reading the tree


def _conjuncts(node: ast.expr) -> Iterator[ast.expr]:
    """The operands of a top-level ``and`` / ``&`` chain (the node itself otherwise)."""
    if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.And):
        for value in node.values:
            yield from _conjuncts(value)
    elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitAnd):
        yield from _conjuncts(node.left)
        yield from _conjuncts(node.right)
    else:
        yield node


def _compares_text_with_number(node: ast.expr, kinds: Mapping[str, str]) -> bool:
    for sub in ast.walk(node):
        if not isinstance(sub, ast.Compare):
            continue
        try:
            comparisons = list(_comparisons(sub))
        except ConditionError:
            continue  # not a form read here: TileDB reports it
        for column, _, values in comparisons:
            if kinds.get(column) in (TEXT, ENUM) and any(_is_number(v) for v in values):
                return True
    return False


def _columns(node: ast.expr) -> tuple[str, ...]:
    """The columns a condition part reads, checking that every node is a form read here."""
    found: dict[str, None] = {}

    def visit(sub: ast.expr) -> None:
        if isinstance(sub, ast.BoolOp):
            for value in sub.values:
                visit(value)
        elif isinstance(sub, ast.BinOp) and isinstance(sub.op, (ast.BitAnd, ast.BitOr)):
            visit(sub.left)
            visit(sub.right)
        elif isinstance(sub, ast.UnaryOp) and isinstance(sub.op, ast.Not):
            visit(sub.operand)
        elif isinstance(sub, ast.Compare):
            for column, _, _ in _comparisons(sub):
                found[column] = None
        else:
            raise ConditionError(f"cannot evaluate {ast.unparse(sub)!r}: expected a comparison "
                                 "of a column with a value, joined by and/or/not")

    visit(node)
    return tuple(found)


def _comparisons(node: ast.Compare) -> Iterator[tuple[str, type, list]]:
    """(column, operator type, values) of each link of a comparison chain."""
    operands = [node.left, *node.comparators]
    for lhs, op, rhs in zip(operands, node.ops, operands[1:]):
        if isinstance(op, (ast.In, ast.NotIn)):
            column = _column_name(lhs)
            if column is None or not isinstance(rhs, ast.List) or not rhs.elts:
                raise ConditionError(f"cannot evaluate {ast.unparse(node)!r}: write "
                                     "`column in [value, ...]`")
            yield column, type(op), [_value(e) for e in rhs.elts]
        elif type(op) in _OPS:
            column, value, kind = _column_name(lhs), rhs, type(op)
            if column is None:
                column, value, kind = _column_name(rhs), lhs, _REVERSED[kind]
            if column is None:
                raise ConditionError(f"cannot evaluate {ast.unparse(node)!r}: one side of a "
                                     "comparison must be a column")
            yield column, kind, [_value(value)]
        else:
            raise ConditionError(f"cannot evaluate {ast.unparse(node)!r}: unsupported "
                                 f"operator {type(op).__name__}")


def _column_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id == "attr" and len(node.args) == 1
            and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        return node.args[0].value
    return None


def _value(node: ast.expr) -> object:
    if isinstance(node, ast.Constant):
        return node.value
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id == "val" and len(node.args) == 1):
        return _value(node.args[0])
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _value(node.operand)
        if _is_number(value):
            return -value if isinstance(node.op, ast.USub) else value
    raise ConditionError(f"cannot evaluate {ast.unparse(node)!r}: values must be constants")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, str)


# --------------------------------------------------------------------------- evaluation


class _Evaluator:
    """Boolean masks of a condition part over decoded columns; parsed columns are cached."""

    def __init__(self, columns: Mapping[str, np.ndarray]) -> None:
        self.columns = columns
        self.numbers: dict[str, np.ndarray] = {}

    def mask(self, node: ast.expr) -> np.ndarray:
        if isinstance(node, ast.BoolOp):
            combine = np.logical_and if isinstance(node.op, ast.And) else np.logical_or
            masks = [self.mask(value) for value in node.values]
            out = masks[0]
            for other in masks[1:]:
                out = combine(out, other)
            return out
        if isinstance(node, ast.BinOp):
            combine = np.logical_and if isinstance(node.op, ast.BitAnd) else np.logical_or
            return combine(self.mask(node.left), self.mask(node.right))
        if isinstance(node, ast.UnaryOp):  # `not`: _columns admitted no other unary here
            return ~self.mask(node.operand)
        out = None
        for column, op, values in _comparisons(node):
            link = self.compare(column, op, values)
            out = link if out is None else out & link
        return out

    def compare(self, column: str, op: type, values: list) -> np.ndarray:
        raw = np.asarray(self.columns[column])
        if any(v is None for v in values):
            raise ConditionError(f"cannot compare column '{column}' with None here; put that "
                                 "comparison in an `and` term of its own (TileDB evaluates it)")
        if all(_is_number(v) for v in values):
            data = self.number_column(column, raw)
        elif all(isinstance(v, (str, bytes)) for v in values):
            if raw.dtype.kind != "O":
                raise ConditionError(f"column '{column}' holds numbers; compare it with a "
                                     f"number, not {values[0]!r}")
            data = raw
            values = [v.decode() if isinstance(v, bytes) else v for v in values]
        else:
            raise ConditionError(f"the values compared with column '{column}' mix numbers "
                                 f"and text: {values}")
        if op in (ast.In, ast.NotIn):
            hit = pd.Series(data).isin(values).to_numpy()
            return hit if op is ast.In else ~hit
        return np.asarray(_OPS[op](data, values[0]), dtype=bool)

    def number_column(self, column: str, raw: np.ndarray) -> np.ndarray:
        if raw.dtype.kind in "biuf":
            return raw
        if column not in self.numbers:
            self.numbers[column] = parse_numbers(raw, column)
        return self.numbers[column]
