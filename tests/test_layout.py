"""The library's layout: every module imports only modules below it (no cycles, also through imports inside
functions), no private names cross a module boundary, no module imports itself, and none is over 700 lines."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / 'mindlink'
MODULES = {p.stem: p for p in sorted(PKG.glob('*.py')) if p.stem not in ('__init__', '_modidx')}


def imports(name: str) -> list:
    "(module it imports, names taken from it) for every mindlink import in module `name`, at any depth."
    tree, out = ast.parse(MODULES[name].read_text()), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ''
            if node.level == 1 and not mod: out += [(a.name, []) for a in node.names]        # from . import x
            elif node.level == 1: out.append((mod.split('.')[0], [a.name for a in node.names]))
            elif mod == 'mindlink': out += [(a.name, []) for a in node.names]                # from mindlink import x
            elif mod.startswith('mindlink.'): out.append((mod.split('.')[1], [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name.split('.')[1], []) for a in node.names if a.name.startswith('mindlink.')]
    return [(m, names) for m, names in out if m in MODULES]


GRAPH = {m: sorted({dep for dep, _ in imports(m)}) for m in MODULES}


def cycles(graph: dict) -> list:
    "Every module from which an import path leads back to itself."
    def reach(start):
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m not in seen: seen.add(m); todo += graph.get(m, [])
        return seen
    return sorted(m for m in graph if m in reach(m))


def test_no_import_cycles():
    assert cycles(GRAPH) == [], f'modules on an import cycle: {cycles(GRAPH)} (graph: {GRAPH})'


def test_the_cycle_check_can_fail():
    assert cycles({'a': ['b'], 'b': ['a'], 'c': ['a']}) == ['a', 'b'] and cycles({'a': ['b'], 'b': []}) == []


@pytest.mark.parametrize('name', MODULES)
def test_no_private_names_across_modules_and_no_self_import(name):
    bad = [(dep, n) for dep, names in imports(name) for n in names if n.startswith('_')]
    assert not bad, f'mindlink.{name} imports private names {bad}'
    assert name not in GRAPH[name], f'mindlink.{name} imports itself'


@pytest.mark.parametrize('name', MODULES)
def test_modules_stay_small(name):
    n = len(MODULES[name].read_text().splitlines())
    assert n <= 700, f'mindlink/{name}.py has {n} lines; split it by what it holds'


def chapter_order() -> dict:
    "Each module's position in the book: the order of the notebooks (`nbs/`) whose `#| default_exp` names it."
    import json, re
    order = {}
    for i, nb in enumerate(sorted((PKG.parent / 'nbs').glob('*.ipynb'))):
        for cell in json.loads(nb.read_text())['cells']:
            m = re.search(r'^#\|\s*default_exp\s+(\S+)', ''.join(cell['source']), re.M)
            if m: order[m.group(1)] = i; break
    return order


# the one import against the book's order (00_index.ipynb says why): validation during training scores retrieval
BACKWARD_OK = {('training', 'metrics')}


def test_modules_import_what_the_book_has_shown():
    "A module imports only modules of earlier chapters (and `utils`, the appendix everything uses), but for BACKWARD_OK."
    order = chapter_order()
    assert set(MODULES) <= set(order), f'modules without a chapter: {set(MODULES) - set(order)}'
    late = [(m, d) for m, deps in GRAPH.items() for d in deps
            if d != 'utils' and order[d] > order[m] and (m, d) not in BACKWARD_OK]
    assert not late, f'modules importing from later chapters: {late}'
    assert all(order[d] > order[m] for m, d in BACKWARD_OK), 'BACKWARD_OK lists an import that is no longer backward'
