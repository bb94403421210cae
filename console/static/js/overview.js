// Overview: this instance's requests, tokens and cost over the last hour
// and day by agent and model, and the store's sessions and top costs.
import { api } from './api.js';
import { h, int, usd, ago } from './dom.js';

export async function overviewPage(ctx) {
  document.title = 'Overview · historyproxy console';
  const refresh = h('button', { type: 'button', class: 'quiet', onclick: () => ctx.navigate('#/overview?t=' + Date.now()) }, 'Refresh');
  ctx.main.append(h('div', { class: 'page-head' }, h('h1', { tabindex: '-1' }, 'Overview'), refresh));
  const o = await api('/overview', { signal: ctx.signal });

  const s = o.sessions;
  ctx.main.append(h('section', { class: 'tiles', 'aria-label': 'Totals' },
    tile('Requests, last hour', int(o.instance.hour.total.requests)),
    tile('Cost, last hour', usd(o.instance.hour.total.cost_usd)),
    tile('Requests, last day', int(o.instance.day.total.requests)),
    tile('Cost, last day', usd(o.instance.day.total.cost_usd)),
    tile('Sessions active, last hour', int(s.active_last_hour)),
    tile('Sessions active, last day', int(s.active_last_day)),
    tile('Sessions in all', int(s.all))));

  const started = o.instance.started_at;
  ctx.main.append(h('p', { class: 'note' },
    'Requests, tokens and cost are what this instance proxied',
    started ? [' since it started (', ago(started), ')'] : '',
    '; other instances count their own. Sessions and their costs come from the store, for every instance.'));

  for (const [name, w] of [['Last hour', o.instance.hour], ['Last day', o.instance.day]]) {
    ctx.main.append(h('section', { class: 'usage' }, h('h2', null, name + ' by agent and model'), usageTable(name, w)));
  }

  const top = h('section', { class: 'top-list' }, h('h2', null, 'Top sessions by cost'),
    h('p', { class: 'note' }, 'Sessions active within the last day, with their all-time totals.'));
  if (o.top_sessions.length === 0) top.append(h('p', { class: 'empty' }, 'No session was active within the last day.'));
  else {
    top.append(h('div', { class: 'table-wrap' }, h('table', { class: 'top-sessions' },
      h('caption', { class: 'visually-hidden' }, 'Top sessions by cost'),
      h('thead', null, h('tr', null, h('th', { scope: 'col' }, 'Conversation'), h('th', { scope: 'col' }, 'Last activity'),
        h('th', { scope: 'col', class: 'num' }, 'Tokens'), h('th', { scope: 'col', class: 'num' }, 'Cost'))),
      h('tbody', null, o.top_sessions.map((x) => h('tr', { 'data-session': x.id },
        h('td', { class: 'title' }, h('a', { href: '#/session/' + encodeURIComponent(x.id) }, x.title || 'Untitled'), h('span', { class: 'sid' }, x.id)),
        h('td', { 'data-label': 'Last activity' }, ago(x.last_active_at)),
        h('td', { class: 'num', 'data-label': 'Tokens' }, int(x.tokens.prompt + x.tokens.completion)),
        h('td', { class: 'num', 'data-label': 'Cost' }, usd(x.cost_usd))))))));
  }
  ctx.main.append(top);
}

function tile(label, value) {
  return h('div', { class: 'tile' }, h('span', { class: 'tile-label' }, label), h('span', { class: 'tile-value' }, value));
}

function usageTable(name, w) {
  if (w.rows.length === 0) return h('p', { class: 'empty' }, 'No request.');
  const cells = (r) => [
    h('td', { class: 'num', 'data-label': 'Requests' }, int(r.requests)),
    h('td', { class: 'num', 'data-label': 'Errors' }, int(r.errors)),
    h('td', { class: 'num', 'data-label': 'Prompt' }, int(r.prompt_tokens)),
    h('td', { class: 'num', 'data-label': 'History' }, int(r.history_tokens)),
    h('td', { class: 'num', 'data-label': 'Completion' }, int(r.completion_tokens)),
    h('td', { class: 'num', 'data-label': 'Cost' }, usd(r.cost_usd)),
  ];
  return h('div', { class: 'table-wrap' }, h('table', { class: 'usage-table' },
    h('caption', { class: 'visually-hidden' }, name + ': requests, tokens and cost by agent and model'),
    h('thead', null, h('tr', null, ['Agent', 'Model'].map((c) => h('th', { scope: 'col' }, c)),
      ['Requests', 'Errors', 'Prompt', 'History', 'Completion', 'Cost'].map((c) => h('th', { scope: 'col', class: 'num' }, c)))),
    h('tbody', null, w.rows.map((r) => h('tr', null, h('th', { scope: 'row' }, r.agent), h('td', { 'data-label': 'Model' }, r.model), cells(r)))),
    h('tfoot', null, h('tr', null, h('th', { scope: 'row', colspan: '2' }, 'All'), cells(w.total)))));
}
