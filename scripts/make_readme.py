"""Generate README.md from nbs/00_index.ipynb (nbdev's own `nbdev_readme` needs Quarto, which we cannot install).

Markdown cells are copied as they are; code cells become ```python blocks, except cells that are not part
of the reading (`#| eval: false`, `#| hide`, `#| echo: false`). Links to chapters point at the notebooks.
`python scripts/make_readme.py --check` exits 1 when README.md is out of date.
"""
import json, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADER = '<!-- Generated from nbs/00_index.ipynb by scripts/make_readme.py; edit the notebook, not this file. -->\n\n'


def render() -> str:
    nb = json.loads((ROOT / 'nbs' / '00_index.ipynb').read_text())
    parts = []
    for cell in nb['cells']:
        src = ''.join(cell['source']).strip('\n')
        if cell['cell_type'] == 'markdown':
            parts.append(src.replace('](0', '](nbs/0').replace('](1', '](nbs/1').replace('](9', '](nbs/9'))
        elif cell['cell_type'] == 'code':
            flags = [l.strip()[2:].replace(' ', '') for l in src.splitlines() if l.strip().startswith('#|')]
            if {'eval:false', 'hide', 'echo:false'} & set(flags): continue
            code = '\n'.join(l for l in src.splitlines() if not l.strip().startswith('#|'))
            parts.append(f'```python\n{code}\n```')
    return HEADER + '\n\n'.join(parts) + '\n'


if __name__ == '__main__':
    text, readme = render(), ROOT / 'README.md'
    if '--check' in sys.argv:
        if readme.read_text() != text: sys.exit('README.md is out of date: run `python scripts/make_readme.py`')
        print('README.md is in sync with nbs/00_index.ipynb')
    else:
        readme.write_text(text); print(f'wrote {readme}')
