"""Build the executed Jupyter Book from `nbs/`.

The notebooks are staged into `_build/book_src/` so that nbdev's cell directives can be turned into
Jupyter Book cell tags without touching the sources:

- `#| eval: false`  -> `skip-execution` (GPU-only or downloaded-weights cells; nbdev_test skips them too)
- `#| hide`, `#| default_exp`, the Colab install cell -> `remove-cell`
- `#| export`       -> `hide-input` (plumbing: folded away, one click to read it); `#| exports` stays visible
- after every exported cell, its functions' and classes' API entries (nbdev's `show_doc`, as `nbdev_docs` adds them):
  signature with each parameter's comment, and the docstring, under a heading of the name (the book's API reference)
- `#| echo: false`  -> `remove-input` (a figure whose drawing code is not the point)
- the `#|` directive lines themselves are dropped from the rendered source.

Each staged chapter starts with one more cell, removed from the book: it installs `scripts/figure_fonts.py`, which
writes into every matplotlib PNG a record of the text drawn on it (font sizes, dpi, legends over data), so that the
reader's test (scripts/read_book.py) can tell how large each figure's text reads on the page.

Cells flagged `#|slow` are skipped by `nbdev_test` but executed here, so every cell runs in CI once.
Every chapter is executed from a fresh kernel (`execute_notebooks: force`); a failing cell fails the build.
`book/_static` (MathJax, the book's CSS) is staged as `_assets`: Jupyter Book adds every `.js` file under a source
`_static` folder to every page, which would load MathJax twice (the second copy fails in the browser's console).
Output: `_build/book_src/_build/html/` (the static files under its `_static/`, as usual).
"""
import ast, json, shutil, subprocess, sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / '_build' / 'book_src'
HTML = SRC / '_build' / 'html'


def toc_files(toc):
    "Every `file:` entry of a Jupyter Book TOC, in order."
    out = [toc['root']]
    for part in toc.get('parts', []):
        out += [c['file'] for c in part.get('chapters', [])]
    return out


def directives(src: str) -> list[str]:
    "nbdev directives (`#| name ...`) at the top of a cell, normalised (`#|slow` -> `slow`)."
    out = []
    for line in src.splitlines():
        s = line.strip()
        if not s: continue
        if not s.startswith('#|'): break
        out.append(s[2:].strip())
    return out


FIGURE_TEXT_MODULE = 'mindlink_book_figure_text'


def figure_text_cell() -> dict:
    """The hidden first cell of a staged chapter: scripts/figure_fonts.py, run as a module of its own (registered as
    `FIGURE_TEXT_MODULE`, so that no name of it lands in the chapter's namespace), then installed."""
    code = (ROOT / 'scripts' / 'figure_fonts.py').read_text()
    src = ('import sys, types\n'
           f'_m = sys.modules[{FIGURE_TEXT_MODULE!r}] = types.ModuleType({FIGURE_TEXT_MODULE!r})\n'
           f'exec(compile({code!r}, "figure_fonts.py", "exec"), _m.__dict__)\n'
           '_m.install()\n'
           'del _m, sys, types\n')
    return {'cell_type': 'code', 'execution_count': None, 'id': 'mindlink-figure-text', 'outputs': [],
            'metadata': {'tags': ['remove-cell']}, 'source': src}


def documented_names(code: str) -> list[str]:
    "The public functions and classes a cell defines, as `show_doc` names them (`Class.method` for fastcore's `@patch`)."
    try: tree = ast.parse('\n'.join(l for l in code.splitlines() if not l.lstrip().startswith(('%', '!'))))
    except SyntaxError: return []
    out = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or node.name.startswith('_'): continue
        decos = [d.func if isinstance(d, ast.Call) else d for d in node.decorator_list]
        decos = [d.id if isinstance(d, ast.Name) else getattr(d, 'attr', '') for d in decos]
        if 'patch' not in decos: out.append(node.name)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.args.args:
            ann = node.args.args[0].annotation
            if isinstance(ann, ast.Name): out.append(f'{ann.id}.{node.name}')
    return out


def api_cell(name: str) -> dict:
    "A cell whose output is `name`'s API entry (nbdev's show_doc, without its link to a source line); the code is not shown."
    src = ('import re as _re\n'
           'from nbdev.showdoc import show_doc as _show_doc\n'
           'from IPython.display import Markdown as _Markdown\n'
           f'_Markdown(_re.sub(r"\\A\\s*---\\s*|^\\[source\\]\\(.*$", "", _show_doc({name})._repr_markdown_(), flags=_re.M))\n')
    return {'cell_type': 'code', 'execution_count': None, 'id': f'api-{name}'.replace('.', '-')[:64], 'outputs': [],
            'metadata': {'tags': ['remove-input', 'api']}, 'source': src}


def stage_notebook(src: Path, dst: Path):
    nb = json.loads(src.read_text())
    cells = [figure_text_cell()]
    for cell in nb['cells']:
        cells.append(cell)
        text = ''.join(cell['source']) if isinstance(cell['source'], list) else cell['source']
        names = [d.split()[0].rstrip(':') if d else '' for d in directives(text)] if cell['cell_type'] == 'code' else []
        if {'export', 'exports'} & set(names): cells += [api_cell(n) for n in documented_names(text)]
    nb['cells'] = cells
    for cell in nb['cells']:
        if cell['cell_type'] != 'code': continue
        text = ''.join(cell['source']) if isinstance(cell['source'], list) else cell['source']
        ds = directives(text)
        if not ds: continue
        tags = set(cell.setdefault('metadata', {}).get('tags', []))
        names = [d.split()[0].rstrip(':') if d else '' for d in ds]
        if any(d.replace(' ', '') in ('eval:false',) for d in ds): tags |= {'skip-execution'}
        if 'eval' in names and 'install mindlink' in text: tags |= {'remove-cell'}
        if {'hide', 'default_exp'} & set(names): tags |= {'remove-cell'}
        if 'export' in names: tags |= {'hide-input'}
        if any(d.replace(' ', '') == 'echo:false' for d in ds): tags |= {'remove-input'}
        kept = [l for l in text.splitlines(keepends=True) if not l.strip().startswith('#|')]
        cell['source'] = ''.join(kept).lstrip('\n')
        cell['metadata']['tags'] = sorted(tags)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(nb, indent=1))


def main(only=None):
    toc = yaml.safe_load((ROOT / 'book' / '_toc.yml').read_text())
    files = toc_files(toc)
    if only is not None:  # a quick build of a few chapters while writing them: `build_book.py --only nbs/03_vit3d`
        files = [toc['root']] + [f for f in files[1:] if f in only]
        toc = {'format': 'jb-book', 'root': toc['root']}
        if files[1:]: toc['parts'] = [{'caption': 'Chapters', 'chapters': [{'file': f} for f in files[1:]]}]
    missing = [f for f in files if not (ROOT / f'{f}.ipynb').exists()]
    if missing: sys.exit(f'book/_toc.yml lists notebooks that do not exist: {missing}')
    mj = ROOT / 'book' / '_static' / 'mathjax' / 'tex-svg-full.js'
    if not mj.exists(): sys.exit(f'{mj} missing: run `make mathjax` (copies it from the npm mathjax package)')
    if SRC.exists(): shutil.rmtree(SRC)
    SRC.mkdir(parents=True)
    shutil.copy(ROOT / 'book' / '_config.yml', SRC / '_config.yml')
    (SRC / '_toc.yml').write_text(yaml.safe_dump(toc, sort_keys=False))
    shutil.copytree(ROOT / 'book' / '_static', SRC / '_assets')   # see the docstring; _config.yml names it
    for f in files: stage_notebook(ROOT / f'{f}.ipynb', SRC / f'{f}.ipynb')
    for d in (ROOT / 'nbs').iterdir():  # data a chapter reads beside it (e.g. nbs/experiments_cache)
        if d.is_dir() and not d.name.startswith(('.', '_')): shutil.copytree(d, SRC / 'nbs' / d.name)
    jb = Path(sys.executable).parent / 'jupyter-book'
    r = subprocess.run([str(jb), 'build', str(SRC), '--builder', 'html'], cwd=ROOT)
    if r.returncode: sys.exit(f'jupyter-book build failed (exit {r.returncode})')
    if not (HTML / 'nbs' / '00_index.html').exists() and not (HTML / 'index.html').exists():
        sys.exit(f'jupyter-book wrote no HTML under {HTML}')
    print(f'book built: {HTML}/index.html')


if __name__ == '__main__':
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--only', nargs='*', help='build only the index and these chapters (e.g. nbs/03_vit3d)')
    main(ap.parse_args().only)
