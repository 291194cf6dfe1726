"""Read the built book as a reader does: open each chapter in headless Chromium (offline), let MathJax typeset it,
and list what reads badly.

A page reads cleanly when
- its prose (text outside code, outputs and math) holds no `$` and no TeX command (`\\frac`, `\\alpha`, ...): math
  that did not parse and leaked out as source;
- its math holds no prose or code names (words set as run-together italic letters: a `$` pair that swallowed a
  sentence, or `$encoder_hid_proj$`); a short label in a sub- or superscript (`L_{rec}`) is fine;
- MathJax typeset every equation and reported no error (no error node, no console error);
- no output cell shows a warning, a traceback, a progress bar or a path of the build machine, and none comes from
  stderr (library logs and warnings go there; a chapter prints what it means to show);
- every image has loaded;
- (layout) no code line scrolls sideways and no table is wider than the page;
- (figures) every figure's text renders at 8 pt or more at the page width, and no legend sits on the data: the build
  records each matplotlib figure's font sizes, dpi and legend boxes in its PNG (scripts/figure_fonts.py) and this
  script scales them by the width the image is shown at (`figure_problems`);
- (process text) the page speaks of the project alone: no PAPER.md, ticket numbers, sessions or lent machines,
  no placeholder left in the text (TBD, TODO, FIXME, NAME_ROW)
  (`PROCESS_TEXT`, checked on the HTML and on README.md).

`python scripts/read_book.py [--shots DIR] [--html DIR] [nbs/01_data ...]` prints each chapter's problems (all the
chapters of book/_toc.yml by default) and, with `--shots`, saves a screenshot of each page in screen-high slices.
tests/test_book.py runs the same checks on the book `make test` built.
"""
import re, shutil, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'scripts'))
import figure_fonts  # noqa: E402

# Elements whose text is not prose: code, outputs, math (typeset or not), navigation.
NOT_PROSE = ('pre, code, kbd, samp, script, style, mjx-container, .math, .cell_input, .cell_output, .headerlink, nav, '
             '.toctree-wrapper, .bd-toc, .prev-next-area, .bd-sidebar-primary, .bd-header, footer')
# TeX commands that mean math leaked into prose (any `\word` outside code is one).
TEX_IN_PROSE = re.compile(r'\\[A-Za-z]+|\\[{}\[\]()|,;!]')
# In math, the content of these commands is meant as words; their names, and labels in `_{...}`/`^{...}`, are fine.
TEXT_COMMANDS = re.compile(r'\\(?:text|textrm|textit|textbf|mathrm|operatorname|mbox)\s*\{[^{}]*\}')
LABEL = re.compile(r'[_^]\s*\{\s*[A-Za-z]+\s*\}|[_^]\s*[A-Za-z]')
WORD_IN_MATH = re.compile(r'[A-Za-z]{3,}')
WARNING = re.compile(r'\b\w*Warning:|^\s*WARNING\b|\bwarnings\.warn\(', re.M)
TRACEBACK = re.compile(r'Traceback \(most recent call last\)|^\s*File "[^"]+", line \d+|^-{5,}\s*$\n\w*(Error|Exception)',
                       re.M)
PROGRESS_BAR = re.compile(r'\d+%\|[^|\n]*\||\d+(\.\d+)?(it|s)/(s|it)\]')
# Paths of the machine that built the book: they mean nothing to a reader (and differ on theirs).
MACHINE_PATH = re.compile(r'site-packages|dist-packages|(?<![\w.])/(?:tmp|work|home|root|usr|var|opt|builds|private|Users)/'
                          r'|[A-Z]:\\\\')

# A figure's smallest text must render at this size (CSS pt) at the page width the reader's test opens (1280 px window).
MIN_FIGURE_PT = 8.0

# Words that speak of how the book was made, or of files outside the repository, rather than of the project. The book
# (and README.md) cites the paper by section, equation, table or figure, and keeps its history in CHANGELOG.md; a
# reader has no PAPER.md, no ticket numbers, no sessions and no lent machines. Each pattern is matched
# case-insensitively on whole words, so that "tissue 3", "silent", "per-session" or "task loss" stay legitimate
# (tests/test_book.py checks both ways).
PROCESS_TEXT = [(re.compile(p, re.I), what) for p, what in (
    (r'\bPAPER\.md\b', 'a file outside the repository (cite the paper by section, equation or table)'),
    (r'\bpaper[-_ ]digest\b', 'a file outside the repository (cite the paper by section, equation or table)'),
    (r'\.\./shared\b', 'a folder outside the repository'),
    (r'\b(?:issue|ticket)s?\s*#?\d+', 'a ticket number'),
    (r'\b(?:PR|pull request)\s*#\d+', 'a ticket number'),
    (r"\bthe issue['’]s\b", 'a ticket (what the work was asked to do)'),
    (r'\blent\b', 'our process (a machine lent to a session)'),
    (r'\bsession with a GPU\b', 'our process (a working session)'),
    (r'\bthis (?:session|task)\b', 'our process (a working session or task)'),
    (r'\$OUT\b', "our process (the device tool's output folder)"),
    (r'\bcarry\s+\S*\.whl\b', "our process (the device tool's options)"),
    (r'\b(?:first|previous|earlier|last) (?:version|draft|edition) of (?:this|the) book\b',
     'history of the book (CHANGELOG.md holds it)'),
    (r'(?-i:\b(?:TBD|TODO|FIXME)\b|\b[A-Z][A-Z0-9_]*_(?:ROW|CMD)\b)', 'a placeholder left in the text'),
)]

_COLLECT = r"""
const done = arguments[arguments.length - 1];
const NOT_PROSE = arguments[0];
const t0 = Date.now();
function collect(mathError) {
  const root = document.querySelector('article') || document.querySelector('main') || document.body;
  const blocks = [];
  for (const el of root.querySelectorAll('p, li, dt, dd, td, th, h1, h2, h3, h4, h5, h6, caption, figcaption, .admonition-title')) {
    if (el.closest(NOT_PROSE) || el.querySelector('p, li')) continue;
    const c = el.cloneNode(true);
    c.querySelectorAll(NOT_PROSE).forEach(e => e.remove());
    const t = c.textContent.replace(/\s+/g, ' ').trim();
    if (t) blocks.push(t);
  }
  const outputs = Array.from(root.querySelectorAll('.cell_output')).map(o => o.textContent);
  const stderr = Array.from(root.querySelectorAll('.cell_output .stderr')).map(o => o.textContent.trim()).filter(t => t);
  let math = [], merrors = [];
  try {
    if (window.MathJax && MathJax.startup && MathJax.startup.document)
      for (const m of MathJax.startup.document.math) {
        math.push(m.math);
        let mml = '';                                 // a TeX error becomes <merror>; an unknown macro red text
        try { mml = MathJax.startup.toMML(m.root); }
        catch (e) { mathError = mathError || `MathJax cannot give back what it typeset (${e})`; }
        const err = mml.match(/data-mjx-error="([^"]*)"/) || (/<merror/.test(mml) && ['', 'error']);
        if (err) merrors.push(`${err[1]} in ${m.math.slice(0, 120)}`);
        else if (/mathcolor="red"/.test(mml)) merrors.push(`undefined control sequence in ${m.math.slice(0, 120)}`);
      }
  } catch (e) { mathError = String(e); }
  const untypeset = Array.from(root.querySelectorAll('.math'))
                         .filter(e => !e.querySelector('mjx-container')).map(e => e.textContent.slice(0, 120));
  const images = Array.from(root.querySelectorAll('img'))
                      .filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src'));
  const scrolling = Array.from(root.querySelectorAll('pre'))       // the visible ones (not a folded cell)
                         .filter(p => p.getClientRects().length && p.scrollWidth > p.clientWidth + 2)
                         .map(p => p.innerText.split('\n').reduce((a, b) => (b.length > a.length ? b : a), ''));
  for (const m of root.querySelectorAll('div.math, mjx-container[display="true"]'))   // an equation cut off at the right
    if (m.scrollWidth > m.clientWidth + 2) scrolling.push('equation: ' + (m.textContent || '').slice(0, 80));
  const wide = Array.from(root.querySelectorAll('table'))      // past the page, or cut off by its output box
                    .filter(t => t.getBoundingClientRect().right > (t.closest('.cell_output') || root).getBoundingClientRect().right + 2)
                    .map(t => t.innerText.split('\n')[0].slice(0, 80));
  // Figures, measured as shown at this window's width (a folded cell is unfolded for the measurement: a reader who
  // opens it sees the figure at that size): displayed and natural width, the heading above, the order on the page.
  const folded = Array.from(root.querySelectorAll('details:not([open])'));
  folded.forEach(d => { d.open = true; });
  const headings = Array.from(root.querySelectorAll('h1, h2, h3, h4'));
  const figures = Array.from(root.querySelectorAll('img')).filter(i => i.complete && i.naturalWidth > 0).map(i => {
    const h = headings.filter(e => e.compareDocumentPosition(i) & Node.DOCUMENT_POSITION_FOLLOWING).pop();
    const hc = h ? h.cloneNode(true) : null;
    if (hc) hc.querySelectorAll('.headerlink').forEach(e => e.remove());
    return {src: i.src, shown: i.getBoundingClientRect().width, natural: i.naturalWidth,
            heading: hc ? hc.textContent.replace(/\s+/g, ' ').trim() : ''};
  });
  folded.forEach(d => { d.open = false; });
  done({blocks, outputs, stderr, math, merrors, untypeset, images, scrolling, wide, figures, mathError: mathError || null});
}
function settle() {  // every image either loaded or failed
  if (Array.from(document.images).every(i => i.complete) || Date.now() - t0 > 30000) collect(null);
  else setTimeout(settle, 100);
}
(function poll() {
  if (!document.querySelector('.math')) return settle();
  const mj = window.MathJax;
  if (mj && mj.startup && mj.startup.promise) return mj.startup.promise.then(settle, e => collect(String(e)));
  if (Date.now() - t0 > 60000) return collect('MathJax never started');
  setTimeout(poll, 100);
})();
"""


def chromium():
    "Headless Chromium with networking off (every host resolves to nothing), its console log kept."
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    exe = next((shutil.which(e) for e in ('chromium', 'chromium-browser', 'google-chrome') if shutil.which(e)), None)
    driver_exe = shutil.which('chromedriver')
    if not (exe and driver_exe): raise RuntimeError('Debian chromium and chromium-driver are needed (`make sysdeps`)')
    opts = webdriver.ChromeOptions()
    opts.binary_location = exe
    for a in ('--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--no-first-run',
              '--disable-background-networking', '--disable-component-update', '--disable-sync', '--disable-quic',
              '--allow-file-access-from-files', '--window-size=1280,1600', '--hide-scrollbars',
              '--host-resolver-rules=MAP * ~NOTFOUND', '--proxy-server=http://127.0.0.1:9', '--proxy-bypass-list=<-loopback>'):
        opts.add_argument(a)
    opts.set_capability('goog:loggingPrefs', {'browser': 'ALL'})
    d = webdriver.Chrome(service=Service(driver_exe), options=opts)
    d.set_script_timeout(120)
    return d


def math_words(tex: str) -> list[str]:
    "Words set as math in `tex` (prose or code names): runs of 3+ letters outside `\\text{}`-like commands and labels."
    t = re.sub(r'\\(?:begin|end)\s*\{[^{}]*\}', ' ', tex)   # environment names (aligned, split, ...)
    t = TEXT_COMMANDS.sub(' ', t)
    t = re.sub(r'\\[A-Za-z]+', ' ', t)   # command names (\frac, \mathcal, ...)
    t = LABEL.sub(' ', t)                # L_{rec}, \xi^{pop}
    return WORD_IN_MATH.findall(t)


def problems(page: dict, console: list[str] = ()) -> list[str]:
    "What reads badly on a page, from what `read_page` collected: one line per problem."
    out = []
    for b in page['blocks']:
        if '$' in b: out.append(f'stray $ in prose: {b[:160]!r}')
        elif TEX_IN_PROSE.search(b): out.append(f'TeX command in prose ({TEX_IN_PROSE.search(b).group()}): {b[:160]!r}')
    for tex in page['math']:
        if w := math_words(tex): out.append(f'prose or code names set as math ({", ".join(w[:4])}): {tex[:160]!r}')
    out += [f'MathJax error: {e[:160]}' for e in page['merrors']]
    out += [f'equation not typeset: {e!r}' for e in page['untypeset']]
    if page['mathError']: out.append(f'MathJax: {page["mathError"]}')
    out += [f'console error: {c[:200]}' for c in console]
    for o in page['outputs']:
        for kind, rx in (('a warning', WARNING), ('a traceback', TRACEBACK), ('a progress bar', PROGRESS_BAR),
                         ("a path of the build machine", MACHINE_PATH)):
            if m := rx.search(o):
                line = next((l for l in o.splitlines() if rx.search(l)), o[max(0, m.start() - 60):m.end() + 60])
                out.append(f'output shows {kind}: {line.strip()[:160]!r}')
    out += [f'output on stderr (a log line or a warning; a chapter prints what it means to show): {e.splitlines()[0][:120]!r}'
            for e in page['stderr']]
    out += [f'image did not load: {s}' for s in page['images']]
    out += [f'{"equation" if s.startswith("equation: ") else "code line"} wider than the page ({len(s)} chars): {s.strip()[:100]!r}'
            for s in page['scrolling']]
    out += [f'table wider than the page: {t!r}' for t in page['wide']]
    return out


def figure_problems(figures: list[dict], min_pt: float = MIN_FIGURE_PT) -> list[str]:
    """The figures of a page whose text reads too small, or whose legend hides data: one line per problem.

    `figures` are what `_COLLECT` measured of each `<img>` (`src`, `shown` and `natural` width in pixels, `heading`).
    Each image's PNG carries the record scripts/figure_fonts.py wrote when the build drew it (font sizes in pt, dpi);
    its text renders at font size × dpi/72 image pixels per pt × shown/natural CSS pixels per image pixel × 0.75 CSS
    pt per CSS pixel. A PNG that matplotlib wrote without a record is a problem (the build's hook missed it); an image
    that is not a matplotlib figure (a photograph) is not checked."""
    out, k = [], 0
    for f in figures:
        rec = figure_fonts.read(_local_path(f['src']))
        if rec is None: continue
        k += 1
        if not rec:
            out.append(f'figure {k} (under {f["heading"]!r}): a matplotlib figure with no text record, so its text '
                       f'size is unknown (drawn where scripts/figure_fonts.py was not installed)')
            continue
        name = (f'figure {k} (under {f["heading"]!r}' + (f', titled {rec["title"]!r}' if rec.get('title') else '')
                + (f', cell `{rec["cell"]}`' if rec.get('cell') else '') + ')')
        if f['shown'] <= 0 or f['natural'] <= 0:
            out.append(f'{name}: not displayed (width {f["shown"]} px), its text cannot be measured'); continue
        factor = rec['dpi'] / 72 * f['shown'] / f['natural'] * 0.75     # rendered CSS pt per font pt
        small = {float(size): n for size, n in rec.get('sizes', {}).items() if float(size) * factor < min_pt - 0.05}
        if small:
            smallest = min(small)
            example = next((t for size, t in rec['texts'] if size == smallest), '')
            out.append(f'{name}: {sum(small.values())} texts render below {min_pt:g} pt at the page width, the smallest '
                       f'at {smallest * factor:.1f} pt ({example!r}: {smallest:g} pt in the figure, drawn at {rec["dpi"]:g} dpi and '
                       f'shown at {f["shown"] / f["natural"]:.0%} of its width); '
                       f'{min_pt:g} pt needs fonts of {min_pt / factor:.1f} pt or more at this width, or a narrower figure')
        for leg in rec.get('legends_over_data', []):
            if not leg['covered']: out.append(f'{name}: its legends could not be checked {leg["axes"]}'); continue
            out.append(f'{name}: legend {leg["legend"]} drawn over data in the axes {leg["axes"]!r} '
                       f'({leg["covered"]} data points under it)')
    return out


def _local_path(src: str) -> Path:
    "The file an `<img>` src (a file:// URL in the built book) points to."
    from urllib.parse import unquote, urlparse
    u = urlparse(src)
    return Path(unquote(u.path)) if u.scheme in ('file', '') else Path('/nonexistent')


def collect(driver, path: Path) -> tuple[dict, list[str]]:
    "Open `path` in `driver`, wait for MathJax and the images; what the page shows, and MathJax's console errors."
    driver.get(Path(path).resolve().as_uri())
    page = driver.execute_async_script(_COLLECT, NOT_PROSE)
    console = [e['message'] for e in driver.get_log('browser')   # MathJax's own errors (the theme's are not ours)
               if e['level'] == 'SEVERE' and re.search(r'mathjax|\bTeX\b', e['message'], re.I)]
    return page, console


def read_page(driver, path: Path) -> list[str]:
    "Open `path` in `driver`, wait for MathJax and the images, and return its problems (its figures' included)."
    page, console = collect(driver, path)
    return problems(page, console) + figure_problems(page['figures'])


def page_text(path: Path) -> str:
    "The text of a built page's article (prose, code, outputs: all a reader can see or unfold), from its HTML."
    from bs4 import BeautifulSoup
    soup = BeautifulSoup(Path(path).read_text(), 'html.parser')
    root = soup.find('article') or soup.find('main') or soup.body or soup
    for e in root.find_all(['script', 'style']): e.decompose()
    return root.get_text(' ').replace('’', "'")   # Sphinx's smart quotes back to the ones the patterns use


def process_text(text: str) -> list[str]:
    "The words in `text` that speak of our process or of files outside the repository (PROCESS_TEXT), in context."
    out = []
    for rx, what in PROCESS_TEXT:
        for m in rx.finditer(text):
            ctx = re.sub(r'\s+', ' ', text[max(0, m.start() - 60):m.end() + 60]).strip()
            out.append(f'{what} ({m.group()!r}): ...{ctx}...')
    return out


def screenshots(driver, out: Path, name: str) -> list[Path]:
    "Save the open page as screen-high slices `name-00.png`, `name-01.png`, ... in `out`."
    out.mkdir(parents=True, exist_ok=True)
    h = driver.execute_script('return window.innerHeight') - 120   # slices overlap by more than the sticky header
    total = driver.execute_script('return document.documentElement.scrollHeight')
    paths = []
    for i, y in enumerate(range(0, max(total - 120, 1), h)):
        driver.execute_script(f'window.scrollTo(0, {y})')
        p = out / f'{name}-{i:02d}.png'
        driver.save_screenshot(str(p)); paths.append(p)
    return paths


def main(argv=None):
    import argparse
    import yaml
    sys.path.insert(0, str(ROOT / 'scripts'))
    from build_book import HTML, toc_files
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('chapters', nargs='*', help='e.g. nbs/01_data (default: every chapter in book/_toc.yml)')
    ap.add_argument('--html', type=Path, default=HTML, help='the built book (default: %(default)s)')
    ap.add_argument('--shots', type=Path, help='save each page as screenshots in this folder')
    a = ap.parse_args(argv)
    chapters = a.chapters or toc_files(yaml.safe_load((ROOT / 'book' / '_toc.yml').read_text()))
    driver, bad = chromium(), 0
    try:
        for ch in chapters:
            page = a.html / f'{ch}.html'
            if not page.exists(): print(f'{ch}: not built'); bad += 1; continue
            ps = read_page(driver, page) + process_text(page_text(page))
            print(f'{ch}: {"reads cleanly" if not ps else f"{len(ps)} problems"}')
            for p in ps: print('   ', p)
            bad += bool(ps)
            if a.shots: screenshots(driver, a.shots, Path(ch).name)
    finally:
        driver.quit()
    if not a.chapters:
        ps = process_text((ROOT / 'README.md').read_text())
        print(f'README.md: {"reads cleanly" if not ps else f"{len(ps)} problems"}')
        for p in ps: print('   ', p)
        bad += bool(ps)
    return 1 if bad else 0


if __name__ == '__main__':
    sys.exit(main())
