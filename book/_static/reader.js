// Long code lines wrap (reader.css) with a hanging indent: each source line becomes a block whose continuation
// rows start four columns right of the line's own indentation, so a wrapped line never looks like a new one.
// Pygments writes a flat run of token spans and text inside <pre>; a token that spans lines is split at each
// newline, keeping its class. Copying still gives the original text.
document.addEventListener('DOMContentLoaded', () => {
  for (const pre of document.querySelectorAll('div.highlight pre')) {
    const lines = [[]];
    for (const node of Array.from(pre.childNodes)) {
      const parts = node.textContent.split('\n');
      parts.forEach((text, i) => {
        if (i > 0) lines.push([]);
        if (!text) return;
        if (node.nodeType === Node.TEXT_NODE) { lines[lines.length - 1].push(document.createTextNode(text)); return; }
        const piece = node.cloneNode(false);
        piece.textContent = text;
        lines[lines.length - 1].push(piece);
      });
    }
    if (lines.length > 1 && lines[lines.length - 1].length === 0) lines.pop();   // the newline that ends the block
    pre.replaceChildren(...lines.map(nodes => {
      const line = document.createElement('span');
      line.className = 'reader-line';
      line.append(...nodes);
      const hang = Math.min(line.textContent.match(/^ */)[0].length + 4, 32);   // at most 32: rows stay readable
      line.style.paddingLeft = `${hang}ch`;
      line.style.textIndent = `-${hang}ch`;
      line.append(document.createTextNode('\n'));   // an inline block ends the row; the newline keeps copied text intact
      return line;
    }));
  }
});
