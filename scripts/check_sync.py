"""Fail when the committed sources disagree with what the tools would write.

1. `mindlink/` must be exactly what `nbdev_export` writes from `nbs/` (exported into a scratch copy).
2. Every notebook must already be clean (`nbdev_clean` would change nothing).
3. README.md must be what `scripts/make_readme.py` generates from `nbs/00_index.ipynb`.
"""
import filecmp, shutil, subprocess, sys, tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def tree(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob('*'))
            if p.is_file() and '__pycache__' not in p.parts}


def main():
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in ('settings.ini', 'setup.py', 'README.md'): shutil.copy(ROOT / name, tmp / name)
        shutil.copytree(ROOT / 'nbs', tmp / 'nbs', ignore=shutil.ignore_patterns('.ipynb_checkpoints'))
        shutil.copytree(ROOT / 'mindlink', tmp / 'mindlink', ignore=shutil.ignore_patterns('__pycache__'))
        before_nbs = tree(tmp / 'nbs')
        r = subprocess.run([BIN / 'nbdev_clean'], cwd=tmp, capture_output=True, text=True)
        if r.returncode: errors.append(f'nbdev_clean failed:\n{r.stderr}')
        changed = [k for k, v in tree(tmp / 'nbs').items() if before_nbs.get(k) != v]
        if changed: errors.append(f'notebooks not clean (run `nbdev_clean`): {changed}')
        exported = tmp / 'mindlink'
        shutil.rmtree(exported); exported.mkdir()
        shutil.copy(ROOT / 'mindlink' / '__init__.py', exported / '__init__.py')
        r = subprocess.run([BIN / 'nbdev_export'], cwd=tmp, capture_output=True, text=True)
        if r.returncode: errors.append(f'nbdev_export failed:\n{r.stderr}')
        want, have = tree(exported), tree(ROOT / 'mindlink')
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        if diff: errors.append(f'mindlink/ differs from what nbdev_export writes (run `nbdev_export`): {diff}')
    r = subprocess.run([sys.executable, ROOT / 'scripts' / 'make_readme.py', '--check'], capture_output=True, text=True)
    if r.returncode: errors.append(r.stderr.strip() or r.stdout.strip())
    if errors: sys.exit('\n'.join(errors))
    print('sync check: mindlink/ == nbdev_export(nbs/), notebooks clean, README in sync')


if __name__ == '__main__':
    main()
