// Sessions: the list, with filters, search, sorting and pages.
import { api } from './api.js';
import { h, int, usd, ago } from './dom.js';

const FILTERS = ['q', 'channel', 'agent', 'user', 'active', 'sort'];
const PAGE = 25;

export async function sessionsPage(ctx) {
  const p = ctx.params;
  document.title = 'Sessions · historyproxy console';
  const query = new URLSearchParams();
  for (const k of FILTERS) if (p.get(k)) query.set(k, p.get(k));
  query.set('limit', String(PAGE));
  if (p.get('cursor')) query.set('cursor', p.get('cursor'));

  const field = (name, label, attrs = {}) => h('div', { class: 'field' },
    h('label', { for: 'f-' + name }, label),
    h('input', { id: 'f-' + name, name, value: p.get(name) || '', autocomplete: 'off', spellcheck: 'false', ...attrs }));
  const select = (name, label, options) => {
    const s = h('select', { id: 'f-' + name, name },
      options.map(([value, text]) => h('option', { value, selected: (p.get(name) || '') === value }, text)));
    return h('div', { class: 'field' }, h('label', { for: 'f-' + name }, label), s);
  };
  const form = h('form', { class: 'filters', role: 'search', 'aria-label': 'Filter sessions' },
    field('q', 'Search titles and ids', { type: 'search', class: 'wide', placeholder: 'e.g. refund or ann@' }),
    field('channel', 'Channel'),
    field('agent', 'Agent'),
    field('user', 'User'),
    select('active', 'Status', [['', 'Any'], ['true', 'Active'], ['false', 'Ended']]),
    select('sort', 'Sort by', [['', 'Last activity'], ['cost', 'Cost']]),
    h('div', { class: 'field actions' },
      h('button', { class: 'primary', type: 'submit' }, 'Apply'),
      h('a', { class: 'button quiet', href: '#/sessions' }, 'Clear')));
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const next = new URLSearchParams();
    for (const [k, v] of new FormData(form)) if (String(v).trim()) next.set(k, String(v).trim());
    ctx.navigate('#/sessions' + (next.size ? '?' + next : ''));
  });

  const heading = h('h1', { tabindex: '-1' }, 'Sessions');
  ctx.main.append(heading, form);
  const results = h('section', { class: 'results', 'aria-labelledby': 'results-caption' }, h('p', { class: 'loading' }, 'Loading sessions…'));
  ctx.main.append(results);

  const list = await api('/sessions?' + query, { signal: ctx.signal });
  results.replaceChildren(render(list, p));
}

function render(list, p) {
  const frag = document.createDocumentFragment();
  const filtered = FILTERS.some((k) => k !== 'sort' && p.get(k));
  const count = `${int(list.total)} session${list.total === 1 ? '' : 's'}${filtered ? ' match' : ''}`;
  if (list.items.length === 0) {
    frag.append(h('p', { id: 'results-caption', class: 'empty' }, filtered ? 'No session matches these filters.' : 'No session yet: conversations appear here once requests go through the proxy.'));
    return frag;
  }
  const now = Date.now();
  const table = h('table', { class: 'sessions' },
    h('caption', { id: 'results-caption' }, count, p.get('sort') === 'cost' ? ', most costly first' : ', most recently active first'),
    h('thead', null, h('tr', null,
      h('th', { scope: 'col' }, 'Conversation'),
      h('th', { scope: 'col' }, 'Last activity'),
      h('th', { scope: 'col', class: 'num' }, 'Messages'),
      h('th', { scope: 'col', class: 'num' }, 'Tokens'),
      h('th', { scope: 'col', class: 'num' }, 'Cost'))),
    h('tbody', null, list.items.map((s) => row(s, now))));
  frag.append(h('div', { class: 'table-wrap' }, table));

  const nav = h('nav', { class: 'pager', 'aria-label': 'Pages' });
  if (p.get('cursor')) {
    const first = new URLSearchParams(p);
    first.delete('cursor');
    nav.append(h('a', { class: 'button quiet', href: '#/sessions' + (first.size ? '?' + first : '') }, 'First page'));
  }
  if (list.next_cursor) {
    const next = new URLSearchParams(p);
    next.set('cursor', list.next_cursor);
    nav.append(h('a', { class: 'button', href: '#/sessions?' + next, rel: 'next' }, 'Next page'));
  }
  if (nav.childElementCount) frag.append(nav);
  return frag;
}

function row(s, now) {
  const href = '#/session/' + encodeURIComponent(s.id);
  const tokens = s.tokens.prompt + s.tokens.completion;
  return h('tr', { 'data-session': s.id },
    h('td', { class: 'title' },
      h('a', { href }, s.title || h('span', { class: 'muted' }, 'Untitled')),
      h('span', { class: 'sid' }, s.id),
      s.is_active ? h('span', { class: 'badge live' }, 'active') : h('span', { class: 'badge' }, 'ended')),
    h('td', { 'data-label': 'Last activity' }, ago(s.last_active_at, now)),
    h('td', { class: 'num', 'data-label': 'Messages' }, int(s.message_count)),
    h('td', { class: 'num', 'data-label': 'Tokens', title: `${int(s.tokens.prompt)} prompt (${int(s.tokens.history)} of them history, ${int(s.tokens.cached)} cached), ${int(s.tokens.completion)} completion, ${int(s.requests)} requests` }, int(tokens)),
    h('td', { class: 'num', 'data-label': 'Cost' }, usd(s.cost_usd)));
}
