"""Every matplotlib figure the book shows carries a record of its text, so that the reader's test can say how large
that text reads on the page.

`scripts/build_book.py` runs `install()` in a hidden first cell of each staged chapter (the cell is removed from the
book). From then on, every PNG that matplotlib writes in that kernel (the inline backend's `plt.show()`, a figure
returned by a cell or passed to `display`, `savefig`; seaborn's and nilearn's figures too, since they draw with
matplotlib) gets one more PNG text chunk, `mindlink:figure-text`, holding JSON:

- `dpi`: the resolution the figure was written at (image pixels per inch);
- `texts`: `[size in pt, text]` for the smallest texts *drawn* (tick labels, axis labels, legends, titles,
  annotations, colour-bar labels, table cells): recorded from `Text.draw` while the PNG is rendered, so a label that
  is hidden, empty or on an axis turned off does not count;
- `min_pt`: the smallest font size drawn (None when the figure has no text);
- `sizes`: how many texts were drawn at each font size, `{"10.0": 24, ...}`;
- `cell`: the first line that draws (`subplots(`, `plot(`, ...) of the cell that drew it, else its first line (from IPython's input history; '' outside IPython);
- `title`: the figure's first title (suptitle, else an axes title, else an axis label), to name it in a report;
- `legends_over_data`: legends whose box covers data: a line's points (its segments sampled every 2 display pixels),
  a scatter's markers or a bar, drawn inside the same axes; each as `{"legend": labels, "axes": title, "covered": n}`.

Once the book is built, `scripts/read_book.py` reads the chunk back from each `<img>` of a page and computes the
size the text renders at: font size × (dpi / 72) image pixels per point × (displayed width / natural width of the
image) CSS pixels, × 0.75 CSS pt per CSS pixel.

The file is self-contained (stdlib, numpy and matplotlib, imported in `install`): build_book.py pastes it into the
staged notebook, so the kernel needs no path to this folder.
"""

KEY = 'mindlink:figure-text'
_STACK = []        # the records of the PNGs being rendered now (innermost last)
_ORIGINAL = {}     # what install() replaced, for uninstall()


def _title(fig) -> str:
    "The figure's first title, else an axes title, else an axis label: a name for it in a report."
    texts = [getattr(fig, '_suptitle', None)]
    for ax in fig.axes: texts += [ax.title, ax._left_title, ax._right_title]
    for ax in fig.axes: texts += [ax.yaxis.label, ax.xaxis.label]
    return next((t.get_text().strip() for t in texts if t is not None and t.get_visible() and t.get_text().strip()), '')


def _covered(ax, box, renderer):
    "How many of `ax`'s data points (lines sampled every 2 px, markers, bars) lie inside the display box `box`."
    import numpy as np
    from matplotlib.collections import PathCollection
    from matplotlib.container import BarContainer
    clip = ax.bbox                                   # data outside the axes is clipped away: it cannot be covered
    x0, y0 = max(box.x0, clip.x0) + 1, max(box.y0, clip.y0) + 1     # 1 px inside: a line along the frame is not "under"
    x1, y1 = min(box.x1, clip.x1) - 1, min(box.y1, clip.y1) - 1
    if x0 >= x1 or y0 >= y1: return 0
    inside = lambda p: int(((p[:, 0] > x0) & (p[:, 0] < x1) & (p[:, 1] > y0) & (p[:, 1] < y1)).sum())
    n = 0
    for line in ax.get_lines():
        if not line.get_visible(): continue
        xy = np.asarray(line.get_xydata(), float)
        xy = xy[np.isfinite(xy).all(1)] if xy.ndim == 2 and len(xy) else np.zeros((0, 2))
        if not len(xy): continue
        p = line.get_transform().transform(xy)
        if line.get_linestyle() not in ('None', '', ' ', 'none') and len(p) > 1:   # the segments, not only the vertices
            seg = np.diff(p, axis=0)
            steps = np.clip(np.ceil(np.hypot(*seg.T) / 2).astype(int), 1, 2000)
            t = np.concatenate([np.arange(k) / k for k in steps])
            i = np.repeat(np.arange(len(seg)), steps)
            p = np.vstack([p[i] + seg[i] * t[:, None], p[-1:]])
        n += inside(p)
    for c in ax.collections:
        if isinstance(c, PathCollection) and c.get_visible() and len(c.get_offsets()):
            n += inside(c.get_offset_transform().transform(np.asarray(c.get_offsets(), float)))
    for c in ax.containers:                          # bars and histograms (not spans or other shapes)
        for r in (c.patches if isinstance(c, BarContainer) else []):
            if not r.get_visible(): continue
            e = r.get_window_extent(renderer)
            if e.width > 0 and e.height > 0 and e.x0 < x1 and e.x1 > x0 and e.y0 < y1 and e.y1 > y0: n += 1
    return n


def _legends_over_data(fig, renderer) -> list:
    out = []
    for ax in fig.axes:
        leg = ax.get_legend()
        if leg is None or not leg.get_visible(): continue
        box = leg.get_window_extent(renderer)
        n = sum(_covered(a, box, renderer) for a in fig.axes if a.bbox.overlaps(box))
        if n: out.append(dict(legend=[t.get_text() for t in leg.get_texts()][:6], axes=ax.get_title() or _title(fig), covered=n))
    for leg in fig.legends:                       # a figure legend over any axes' data
        if not leg.get_visible(): continue
        box = leg.get_window_extent(renderer)
        n = sum(_covered(a, box, renderer) for a in fig.axes if a.bbox.overlaps(box))
        if n: out.append(dict(legend=[t.get_text() for t in leg.get_texts()][:6], axes='(figure legend)', covered=n))
    return out


def _running_cell() -> str:
    "A line of the notebook cell running now (IPython's input history) to name the figure by: its first drawing line."
    import re
    try:
        from IPython import get_ipython
        src = get_ipython().history_manager.input_hist_raw[-1]
    except Exception:
        return ''
    lines = [l.strip() for l in src.splitlines() if l.strip() and not l.lstrip().startswith('#')]
    drawing = [l for l in lines if re.search(r'\bsubplots\(|\bfigure\(|\bplot\w*\(|\bimshow\(|\bsns\.', l)]
    return (drawing or lines or [''])[0][:70]


def record(fig, texts, renderer) -> dict:
    "The record of `fig` as just drawn: `texts` are the `(size, text)` pairs `Text.draw` saw."
    from collections import Counter
    sizes = Counter(s for s, _ in texts)
    texts = sorted(set(texts))
    try: legends = _legends_over_data(fig, renderer)
    except Exception as e: legends = [dict(legend=[], axes=f'(not checked: {type(e).__name__}: {e})', covered=0)]
    return dict(dpi=float(fig.dpi), min_pt=texts[0][0] if texts else None, texts=[list(t) for t in texts[:8]],
                sizes={str(k): v for k, v in sorted(sizes.items())}, title=_title(fig)[:80], cell=_running_cell(),
                legends_over_data=legends)


def install():
    "Record the text of every figure matplotlib writes as PNG in this process (idempotent)."
    import functools, json
    import matplotlib.image
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text
    if _ORIGINAL: return
    _ORIGINAL.update(draw=Text.draw, print_png=FigureCanvasAgg.print_png, imsave=matplotlib.image.imsave)

    # functools.wraps keeps each original's module and signature: matplotlib filters the keywords it passes to a
    # print method by that signature (e.g. `orientation`), for print methods of its own modules only.
    @functools.wraps(_ORIGINAL['draw'])
    def draw(self, renderer):
        if _STACK and self.get_visible() and self.get_text().strip():
            _STACK[-1]['texts'].append((round(float(self.get_fontsize()), 2), self.get_text().strip()[:40]))
        return _ORIGINAL['draw'](self, renderer)

    @functools.wraps(_ORIGINAL['print_png'])
    def print_png(self, filename_or_obj, *args, **kw):
        _STACK.append(dict(figure=self.figure, canvas=self, texts=[]))
        try: return _ORIGINAL['print_png'](self, filename_or_obj, *args, **kw)
        finally: _STACK.pop()

    @functools.wraps(_ORIGINAL['imsave'])
    def imsave(fname, arr, *args, metadata=None, **kw):
        if _STACK and kw.get('format', 'png') == 'png':   # the figure's pixels, drawn: add its record
            top = _STACK[-1]
            rec = record(top['figure'], top['texts'], top['canvas'].get_renderer())
            metadata = {**(metadata or {}), KEY: json.dumps(rec)}
        return _ORIGINAL['imsave'](fname, arr, *args, metadata=metadata, **kw)

    Text.draw, FigureCanvasAgg.print_png, matplotlib.image.imsave = draw, print_png, imsave


def uninstall():
    "Undo `install()`."
    import matplotlib.image
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text
    if not _ORIGINAL: return
    Text.draw, FigureCanvasAgg.print_png = _ORIGINAL['draw'], _ORIGINAL['print_png']
    matplotlib.image.imsave = _ORIGINAL['imsave']
    _ORIGINAL.clear()


def read(path) -> dict | None:
    """The record in the PNG at `path`: a dict; `{}` for a matplotlib PNG written without one (not recorded by
    `install`); None for any other image (a photograph, a logo: no text to measure)."""
    import json
    from PIL import Image
    try:
        with Image.open(path) as im:
            if im.format != 'PNG': return None
            info = dict(getattr(im, 'text', {}) or im.info)
    except Exception:
        return None
    if KEY in info: return json.loads(info[KEY])
    return {} if 'matplotlib' in str(info.get('Software', '')).lower() else None
