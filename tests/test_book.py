"""The executed Jupyter Book: every chapter's HTML exists, holds its equations and executed outputs, serves
MathJax itself, and typesets offline in headless Chromium.

`make test` builds the book (scripts/build_book.py) before pytest runs; run alone, these tests build it first.
"""
import json, os, re, shutil, subprocess, sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'scripts'))
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
    assert not re.search(r'<script[^>]+src="https?://[^"]*mathjax', html, flags=re.I), f'{chapter}: MathJax from a CDN'
    outputs = re.findall(r'<div class="cell_output docutils container">(.*?)</div>\s*</div>', html, flags=re.S)
    assert any(o.strip() for o in outputs), f'{chapter}: no executed output in the HTML'


def _chromium():
    for exe in ('chromium', 'chromium-browser', 'google-chrome'):
        if shutil.which(exe): return shutil.which(exe)


@pytest.mark.skipif(os.environ.get('MINDLINK_SKIP_BROWSER') == '1', reason='MINDLINK_SKIP_BROWSER=1')
def test_index_typesets_offline_in_chromium(html_dir):
    "Open the built index from disk with networking off: MathJax must typeset and the figure must load."
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait
    exe, driver_exe = _chromium(), shutil.which('chromedriver')
    assert exe and driver_exe, 'Debian chromium and chromium-driver are needed (`make sysdeps`)'
    opts = webdriver.ChromeOptions()
    opts.binary_location = exe
    for a in ('--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--no-first-run',
              '--disable-background-networking', '--disable-component-update', '--disable-sync', '--disable-quic',
              '--allow-file-access-from-files', '--window-size=1280,1600',
              # networking disabled: every host resolves to nothing and every proxy request goes nowhere
              '--host-resolver-rules=MAP * ~NOTFOUND', '--proxy-server=http://127.0.0.1:9', '--proxy-bypass-list=<-loopback>'):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(driver_exe), options=opts)
    try:
        driver.get((html_dir / 'nbs' / '00_index.html').as_uri())
        WebDriverWait(driver, 60).until(lambda d: d.execute_script(
            "return document.querySelectorAll('mjx-container svg').length > 0 && "
            "Array.from(document.images).every(i => i.complete)"))
        n_math = driver.execute_script("return document.querySelectorAll('mjx-container svg').length")
        n_raw = driver.execute_script(
            "return document.querySelectorAll('span.math:not(:has(mjx-container))').length")
        figs = driver.execute_script(
            "return Array.from(document.querySelectorAll('.cell_output img')).map(i => [i.src, i.naturalWidth])")
        shot = ROOT / '_build' / 'screenshots' / '00_index.png'
        shot.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(shot))
    finally:
        driver.quit()
    assert n_math > 0, 'MathJax typeset nothing'
    assert n_raw == 0, f'{n_raw} equations left untypeset'
    assert figs and all(w > 0 for _, w in figs), f'a figure did not load: {figs}'
