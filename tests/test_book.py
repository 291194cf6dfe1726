"""The executed Jupyter Book: every chapter's HTML exists, holds its equations and executed outputs, serves
MathJax itself, and reads cleanly in headless Chromium, offline (scripts/read_book.py: equations typeset, no TeX or
build noise on the page, figures loaded).

`make test` builds the book (scripts/build_book.py) before pytest runs; run alone, these tests build it first.
"""
import json, os, re, subprocess, sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'scripts'))
import read_book  # noqa: E402
from build_book import HTML, toc_files  # noqa: E402

CHAPTERS = toc_files(yaml.safe_load((ROOT / 'book' / '_toc.yml').read_text()))


@pytest.fixture(scope='module')
def html_dir():
    if not (HTML / 'nbs' / '00_index.html').exists():
        subprocess.run([sys.executable, str(ROOT / 'scripts' / 'build_book.py')], check=True)
    return HTML


def test_toc_lists_every_notebook():
    on_disk = sorted(f'nbs/{p.stem}' for p in (ROOT / 'nbs').glob('*.ipynb'))
    assert sorted(CHAPTERS) == on_disk, 'book/_toc.yml must list exactly the notebooks in nbs/'
    assert CHAPTERS == sorted(CHAPTERS), 'chapters must appear in notebook order'


def _display_equations(nb_path: Path) -> int:
    nb = json.loads(nb_path.read_text())
    md = '\n'.join(''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'markdown')
    return len(re.findall(r'\$\$(.+?)\$\$', md, flags=re.S))


def _inline_equations(nb_path: Path) -> int:
    nb = json.loads(nb_path.read_text())
    md = '\n'.join(''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'markdown')
    md = re.sub(r'\$\$(.+?)\$\$', '', md, flags=re.S)
    return len(re.findall(r'(?<![\\$])\$[^$\n]+\$', md))


@pytest.mark.parametrize('chapter', CHAPTERS)
def test_chapter_html(html_dir, chapter):
    page = html_dir / f'{chapter}.html'
    assert page.exists(), f'{page} was not built'
    html = page.read_text()
    n_display, n_inline = _display_equations(ROOT / f'{chapter}.ipynb'), _inline_equations(ROOT / f'{chapter}.ipynb')
    # a `$$…$$` on a line of a paragraph renders as a span holding display math, so count both kinds together
    got = len(re.findall(r'<(?:div|span) class="math notranslate nohighlight"', html))
    assert got >= n_display + n_inline, (f'{chapter}: {n_display} display and {n_inline} inline equations in the '
                                         f'notebook, {got} rendered in the HTML')
    if n_display + n_inline:
        assert 'mathjax/tex-svg-full.js' in html, f'{chapter}: MathJax is not served from the book'
    assert html.count('mathjax/tex-svg-full.js') <= 1, f'{chapter}: MathJax loaded twice (see scripts/build_book.py)'
    assert not re.search(r'<script[^>]+src="https?://[^"]*mathjax', html, flags=re.I), f'{chapter}: MathJax from a CDN'
    outputs = re.findall(r'<div class="cell_output docutils container">(.*?)</div>\s*</div>', html, flags=re.S)
    assert any(o.strip() for o in outputs), f'{chapter}: no executed output in the HTML'


@pytest.fixture(scope='module')
def browser():
    "One headless Chromium, networking off, for every page of the module."
    if os.environ.get('MINDLINK_SKIP_BROWSER') == '1': pytest.skip('MINDLINK_SKIP_BROWSER=1')
    driver = read_book.chromium()
    yield driver
    driver.quit()


# A page with one of each defect the reader's test looks for, and the same page mended: the checks must tell them
# apart (the broken page would pass a test that only counts equations).
_PAGE = """<!DOCTYPE html><html><head><meta charset="utf-8">
<script>window.MathJax = {{"options": {{"processHtmlClass": "tex2jax_process|mathjax_process|math|output_area"}}}}</script>
<script defer src="{mathjax}"></script></head><body><article>
<p>The loss {inline} is averaged over hidden patches.</p>
<div class="math notranslate nohighlight">\\[{display}\\]</div>
<p>{prose}</p>
<div class="cell docutils container"><div class="cell_input docutils container"><pre>{code}</pre></div>
<div class="cell_output docutils container">
<div class="output {stream} highlight-myst-ansi notranslate"><div class="highlight"><pre>{text}</pre></div></div>
<img src="{image}" alt="figure"></div></div>
<table><tr>{row}</tr></table>
</article></body></html>"""
_CLEAN = dict(inline='<span class="math notranslate nohighlight">\\(L_{rec}\\)</span>',
              display="L_{align} = \\frac{1}{N} \\sum_i \\| b'_i - z_i \\|_2", prose='diffusers computes it inside the UNet.',
              stream='stream', text='subject 1: 40 images', image='figure.png', code='x = 1', row='<td>preset</td><td>paper</td>')
_BROKEN = dict(inline='<span class="math notranslate nohighlight">\\(\\fraq{1}{N}\\)</span>',   # a TeX error
               display='diffusers computes c_i inside the UNet',                                    # prose set as math
               prose='We feed $b\' = P(E_b(B))$ with \\mathrm{Attn} straight in.',                # math left as source
               stream='stderr', text=('/work/.venv/lib/python3.11/site-packages/tqdm/auto.py:21: TqdmWarning: IProgress not found\n'
                       'Writing model shards:   0%|          | 0/1 [00:00&lt;?, ?it/s]\n'
                       'Traceback (most recent call last):'),
               image='missing.png', code='x = ' + ' + '.join(['1'] * 200),                # one long line
               row=''.join(f'<td>column_name_{i}</td>' for i in range(60)))                       # a wide table


def test_reader_checks_can_fail(browser, tmp_path):
    "The reader's checks pass a well-made page and name every defect of a broken one."
    from PIL import Image
    mathjax = ROOT / 'book' / '_static' / 'mathjax' / 'tex-svg-full.js'
    assert mathjax.exists(), f'{mathjax} missing: run `make mathjax`'
    Image.new('RGB', (8, 8), 'white').save(tmp_path / 'figure.png')
    for name, parts in (('clean', _CLEAN), ('broken', _BROKEN)):
        (tmp_path / f'{name}.html').write_text(_PAGE.format(mathjax=mathjax.as_uri(), **parts))
    assert read_book.read_page(browser, tmp_path / 'clean.html') == []
    found = '\n'.join(read_book.read_page(browser, tmp_path / 'broken.html'))
    for defect in ('MathJax error', 'prose or code names set as math (diffusers, computes', 'stray $ in prose',
                   'output shows a warning', 'output shows a progress bar', 'output shows a traceback',
                   'output shows a path of the build machine', 'image did not load: missing.png',
                   'output on stderr', 'code line wider than the page', 'table wider than the page'):
        assert defect in found, f'the checks missed {defect!r}:\n{found}'
    (tmp_path / 'tex.html').write_text(_PAGE.format(mathjax=mathjax.as_uri(), **{**_CLEAN, 'prose': 'a \\alpha here'}))
    assert any('TeX command in prose (\\alpha)' in p for p in read_book.read_page(browser, tmp_path / 'tex.html'))


@pytest.mark.parametrize('chapter', CHAPTERS)
def test_chapter_reads_cleanly(html_dir, browser, chapter):
    """Each chapter as a reader sees it in Chromium, offline: every equation typeset (no MathJax error, no TeX or
    stray `$` left in the prose, no prose set as math), outputs free of warnings, tracebacks, progress bars and
    build-machine paths, every figure loaded, no code line or table wider than the page."""
    page = html_dir / f'{chapter}.html'
    assert page.exists(), f'{page} was not built'
    problems = read_book.read_page(browser, page)
    shot = ROOT / '_build' / 'screenshots' / f'{Path(chapter).name}.png'   # the top of the page, for a person to look at
    shot.parent.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(shot))
    assert not problems, f'{chapter} ({page}) reads badly:\n' + '\n'.join(problems)
