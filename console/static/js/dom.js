// Small helpers to build the page. Text always goes in as text nodes, never
// as HTML: conversations hold whatever users and models wrote.

// h builds an element: h('a', {href: '#/x', class: 'y'}, 'text', child).
// Attributes named on* are listeners; true sets a boolean attribute; null,
// undefined and false are left out.
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') el.className = v;
    else if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (v === true) el.setAttribute(k, '');
    else el.setAttribute(k, String(v));
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const c of [children].flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

export function clear(el) {
  while (el.firstChild) el.firstChild.remove();
  return el;
}

const intFmt = new Intl.NumberFormat('en-US');
export const int = (n) => intFmt.format(n || 0);

// usd shows a cost: cents for sums, more digits for the small costs of
// single turns, so a turn of $0.0004 does not read as $0.00.
export function usd(n) {
  n = n || 0;
  if (n === 0) return '$0';
  if (n >= 1) return '$' + n.toFixed(2);
  if (n >= 0.01) return '$' + n.toFixed(3);
  return '$' + n.toPrecision(2).replace(/(\.\d*?)0+$/, '$1');
}

const absFmt = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'short' });

// ago says how long ago an RFC 3339 time was, in a <time> element whose
// title gives the full date.
export function ago(iso, now = Date.now()) {
  if (!iso) return h('span', { class: 'muted' }, '—');
  const t = Date.parse(iso);
  const s = Math.max(0, Math.round((now - t) / 1000));
  let text;
  if (s < 45) text = 'just now';
  else if (s < 90 * 60) text = `${Math.max(1, Math.round(s / 60))} min ago`;
  else if (s < 36 * 3600) text = `${Math.round(s / 3600)} h ago`;
  else text = absFmt.format(t);
  return h('time', { datetime: iso, title: absFmt.format(t) }, text);
}

export function clock(iso) {
  if (!iso) return '';
  const t = new Date(iso);
  return h('time', { datetime: iso, title: absFmt.format(t) }, t.toLocaleTimeString(undefined, { hour: '2-digit', minute: '2-digit' }));
}

// toast says something briefly in the page's live region.
let toastTimer = 0;
export function toast(text, kind = 'info') {
  const el = document.getElementById('toast');
  el.textContent = text;
  el.dataset.kind = kind;
  el.classList.add('shown');
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => {
    el.classList.remove('shown');
    el.textContent = '';
  }, 6000);
}

// dialog shows a modal <dialog> with a form and resolves with the value of
// the button that closed it ('' when cancelled with Escape). build fills
// the form before the buttons.
export function dialog({ title, build, buttons }) {
  return new Promise((resolve) => {
    const form = h('form', { method: 'dialog' });
    const heading = h('h2', { id: 'dialog-title' }, title);
    form.append(heading);
    if (build) append(form, build());
    const row = h('div', { class: 'buttons' });
    for (const b of buttons) {
      row.append(h('button', { value: b.value, class: b.class, type: 'submit', autofocus: b.autofocus, formnovalidate: b.value === 'cancel' }, b.label));
    }
    form.append(row);
    const dlg = h('dialog', { 'aria-labelledby': 'dialog-title' }, form);
    document.body.append(dlg);
    dlg.addEventListener('close', () => {
      const value = dlg.returnValue;
      const data = new FormData(form);
      dlg.remove();
      resolve({ value, data });
    });
    dlg.showModal();
  });
}

// confirm asks a yes or no question in a dialog.
export async function confirm({ title, text, yes, danger }) {
  const r = await dialog({
    title,
    build: () => [h('p', null, text)],
    buttons: [
      { value: 'cancel', label: 'Cancel', class: 'quiet', autofocus: true },
      { value: 'yes', label: yes, class: danger ? 'danger' : 'primary' },
    ],
  });
  return r.value === 'yes';
}
