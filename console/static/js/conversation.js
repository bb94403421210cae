// A conversation: the transcript as a chat, followed live through the
// watch stream, with the conversation switcher and the session's actions.
import { api, APIError, AuthError, authHeaders, sessionPath, watchURL } from './api.js';
import { follow } from './sse.js';
import { h, clear, int, usd, ago, clock, toast, dialog, confirm } from './dom.js';

export async function conversationPage(ctx, id) {
  const main = ctx.main;
  let detail;
  try {
    detail = await api(sessionPath(id), { signal: ctx.signal });
  } catch (e) {
    if (e instanceof APIError && (e.status === 404 || e.status === 400)) {
      document.title = 'No such session · historyproxy console';
      main.append(h('h1', { tabindex: '-1' }, 'No such session'),
        h('p', null, e.message),
        h('p', null, h('a', { href: '#/sessions' }, 'Back to the sessions')));
      return;
    }
    throw e;
  }
  const wanted = ctx.params.get('conversation') || '';
  // Live: the page shows the session's latest conversation and follows
  // the watch, which moves on to a newer one when it starts.
  const live = !wanted || wanted === detail.conversation;
  const view = { id, detail, shown: wanted || detail.conversation || null, live };

  const title = h('h1', { id: 'conv-title', tabindex: '-1' });
  const facts = h('dl', { class: 'facts' });
  const switcher = h('select', { id: 'conv', name: 'conversation' });
  const status = h('span', { class: 'live-status', role: 'status', 'data-state': live ? 'connecting' : 'static' });
  const older = h('button', { type: 'button', class: 'quiet older', hidden: true }, 'Show earlier messages');
  const ol = h('ol', { class: 'transcript', 'aria-label': 'Messages' });
  const t = new Transcript(ol);

  const actions = h('div', { class: 'actions', role: 'group', 'aria-label': 'Session actions' });
  const rename = h('button', { type: 'button', onclick: () => doRename(ctx, view, refresh) }, 'Rename');
  const reset = h('button', { type: 'button', onclick: () => doReset(ctx, view, refresh) }, 'Reset');
  const compact = h('button', { type: 'button', hidden: !ctx.caps.compact, 'data-action': 'compact' }, 'Compact');
  compact.addEventListener('click', () => doCompact(ctx, view, compact, refresh));
  const erase = h('button', { type: 'button', class: 'danger', onclick: () => doErase(ctx, view) }, 'Erase');
  actions.append(rename, reset, compact, erase);

  main.append(
    h('p', { class: 'crumbs' }, h('a', { href: '#/sessions' }, '← Sessions')),
    h('header', { class: 'conv-head' }, title, h('p', { class: 'sid' }, id), facts, actions),
    h('div', { class: 'switcher' },
      h('label', { for: 'conv' }, 'Conversation'), switcher, status),
    h('section', { class: 'chat', 'aria-labelledby': 'conv-title' }, older, ol));

  switcher.addEventListener('change', () => {
    const v = switcher.value;
    ctx.navigate('#/session/' + encodeURIComponent(id) + (v && v !== view.detail.conversation ? '?conversation=' + encodeURIComponent(v) : ''));
  });

  function paint() {
    const d = view.detail;
    const conv = d.conversations.find((c) => c.id === view.shown);
    const name = (conv && conv.title) || d.title || 'Untitled conversation';
    title.textContent = name;
    document.title = name + ' · historyproxy console';
    clear(facts);
    const fact = (k, v) => h('div', null, h('dt', null, k), h('dd', null, v));
    facts.append(fact('Channel', d.channel), fact('User', d.user), fact('Agent', d.agent),
      fact('Messages', int(d.message_count)),
      fact('Tokens', h('span', { title: `${int(d.tokens.prompt)} prompt (${int(d.tokens.history)} history, ${int(d.tokens.cached)} cached), ${int(d.tokens.completion)} completion` }, int(d.tokens.prompt + d.tokens.completion))),
      fact('Cost', usd(d.cost_usd)), fact('Requests', int(d.requests)),
      fact('Last activity', ago(d.last_active_at)));
    clear(switcher);
    const convs = [...d.conversations].sort((a, b) => convNumber(b.id) - convNumber(a.id));
    for (const c of convs) {
      const label = `${c.id} · ${c.title || 'untitled'} · ${int(c.message_count)} messages · ${c.status}${c.expired ? ' (expired)' : ''}`;
      switcher.append(h('option', { value: c.id, selected: c.id === view.shown }, label));
    }
    if (convs.length === 0) switcher.append(h('option', { value: '' }, 'no conversation yet'));
    switcher.disabled = convs.length < 2;
    reset.disabled = !d.is_active;
  }

  // A conversation id the page has seen, with another creation time or
  // fewer messages, is a new conversation of an erased session.
  const seen = new Map(); // conversation id -> {created, count}
  function remember(d) {
    for (const c of d.conversations) seen.set(c.id, { created: c.created_at, count: c.message_count });
  }
  function erasedSince(d) {
    return d.conversations.some((c) => {
      const s = seen.get(c.id);
      return s && (s.created !== c.created_at || c.message_count < s.count);
    });
  }
  remember(detail);

  let refreshTimer = 0;
  async function refresh(soon) {
    clearTimeout(refreshTimer);
    if (soon) {
      refreshTimer = setTimeout(() => refresh(false), 400);
      return;
    }
    try {
      const fresh = await api(sessionPath(id), { signal: ctx.signal });
      if (erasedSince(fresh)) {
        // The session was erased and began again: what the page shows is
        // gone from the store, and the watch does not say so. Start over.
        toast('This session was erased and began again: showing what is stored now.', 'error');
        ctx.navigate(location.hash);
        return;
      }
      remember(fresh);
      view.detail = fresh;
      paint();
    } catch (e) {
      if (e instanceof AuthError) ctx.needLogin('The token was refused; sign in again.');
      else if (!ctx.signal.aborted && e instanceof APIError && e.status === 404) toast('This session no longer exists.', 'error');
    }
  }
  ctx.signal.addEventListener('abort', () => clearTimeout(refreshTimer));

  let before = null; // the id to page back from, for earlier messages
  older.addEventListener('click', async () => {
    older.disabled = true;
    try {
      const q = new URLSearchParams({ conversation: t.conversation, before, limit: '500' });
      const page = await api(sessionPath(id, '/timeline?' + q), { signal: ctx.signal });
      t.prepend(page.items);
      setOlder(page.has_more ? page.next_before : null);
    } catch (e) {
      if (e instanceof AuthError) ctx.needLogin('The token was refused; sign in again.');
      else toast(e.message, 'error');
    } finally {
      older.disabled = false;
    }
  });
  function setOlder(next) {
    before = next;
    older.hidden = !next;
  }

  paint();

  if (!live) {
    status.textContent = 'Ended conversation: not live';
    const q = new URLSearchParams({ conversation: view.shown, newest: 'true', limit: '1000' });
    const page = await api(sessionPath(id, '/timeline?' + q), { signal: ctx.signal });
    t.reset(page.conversation);
    t.append(page.items);
    setOlder(page.has_more ? page.next_before : null);
    return;
  }

  const states = { connecting: 'Connecting…', open: 'Live', reconnecting: 'Reconnecting…' };
  follow(watchURL(id), {
    headers: () => authHeaders(),
    signal: ctx.signal,
    onStatus(state) {
      if (state === 'unauthorized') {
        ctx.needLogin('The token was refused; sign in again.');
        return;
      }
      status.dataset.state = state;
      status.textContent = states[state] || state;
    },
    onEvent(ev) {
      const data = JSON.parse(ev.data);
      const stick = nearBottom();
      switch (ev.type) {
        case 'snapshot':
          // First, or after a gap too old to resume: start over from it.
          ol.dataset.snapshots = String(Number(ol.dataset.snapshots || 0) + 1);
          t.reset(data.conversation);
          t.append(data.items);
          setOlder(data.has_more ? data.next_before : null);
          if (data.generating) t.draft(null);
          if (data.conversation !== view.shown) {
            view.shown = data.conversation;
            refresh(true);
          }
          break;
        case 'message':
          if (data.conversation !== t.conversation) {
            // A late turn of an ended conversation is not this page's;
            // a newer conversation is: the page moves on to it.
            if (t.conversation && convNumber(data.conversation) < convNumber(t.conversation)) return;
            t.reset(data.conversation, true);
            setOlder(null);
            view.shown = data.conversation;
          }
          t.message(data);
          refresh(true);
          break;
        case 'delta':
          t.delta(data);
          break;
        case 'complete':
          t.complete(data.generation);
          refresh(true);
          break;
      }
      if (stick) scrollToEnd();
    },
  });
}

function nearBottom() {
  const doc = document.documentElement;
  return window.innerHeight + window.scrollY >= doc.scrollHeight - 120;
}

function scrollToEnd() {
  window.scrollTo({ top: document.documentElement.scrollHeight, behavior: 'instant' });
}

function convNumber(id) {
  const m = /^c(\d+)$/.exec(id || '');
  return m ? Number(m[1]) : 0;
}

// Transcript keeps the page's list of messages: each stored message once
// (by id), tool results under the call they answer, and the replies being
// written (drafts, by generation) at the end.
class Transcript {
  constructor(ol) {
    this.ol = ol;
    this.reset(null);
  }

  // reset empties the list for conversation conv; keepDrafts keeps a
  // reply being written (a turn that starts a new conversation streams
  // before its messages are recorded).
  reset(conv, keepDrafts = false) {
    const drafts = keepDrafts ? [...this.drafts || []] : [];
    clear(this.ol);
    this.conversation = conv;
    this.items = new Map(); // message id -> element
    this.calls = new Map(); // tool call id -> its result's slot
    this.drafts = new Map(); // generation -> draft
    for (const [gen, d] of drafts) {
      this.drafts.set(gen, d);
      this.ol.append(d.li);
    }
  }

  append(items) {
    for (const e of items) this.add(e);
  }

  // prepend puts earlier messages before the ones shown.
  prepend(items) {
    const first = this.ol.firstChild;
    for (const e of items) this.add(e, first);
  }

  // add shows a stored message once; before, when given, is the element
  // it goes before (else before the drafts, which stay last).
  add(e, before) {
    if (this.items.has(e.id)) return null;
    if (e.role === 'tool' && e.tool_call_id && this.calls.has(e.tool_call_id)) {
      const slot = this.calls.get(e.tool_call_id);
      fillResult(slot, e);
      this.items.set(e.id, slot);
      return slot;
    }
    const li = renderEntry(e, this.calls);
    this.items.set(e.id, li);
    const firstDraft = this.drafts.size ? this.drafts.values().next().value.li : null;
    this.ol.insertBefore(li, before || firstDraft || null);
    return li;
  }

  // message shows a message the watch reports. The reply a draft was
  // showing (the turn's last message, the one with the turn's usage)
  // takes the draft's place, so nothing moves.
  message(e) {
    if (e.role === 'assistant' && e.usage && this.drafts.size) {
      const [gen, d] = this.drafts.entries().next().value;
      this.drafts.delete(gen);
      if (this.items.has(e.id)) {
        d.li.remove();
        return;
      }
      const li = renderEntry(e, this.calls);
      this.items.set(e.id, li);
      d.li.replaceWith(li);
      return;
    }
    this.add(e);
  }

  // draft gives the draft of a generation, made on first use. A draft
  // made before its generation was known (a snapshot said a reply was
  // being written) is taken by the first generation that shows up.
  draft(gen) {
    let d = this.drafts.get(gen);
    if (d) return d;
    if (gen !== null && this.drafts.has(null)) {
      d = this.drafts.get(null);
      this.drafts.delete(null);
    } else {
      const body = h('div', { class: 'body' });
      const calls = h('div', { class: 'calls' });
      const li = h('li', { class: 'msg assistant draft', 'data-role': 'assistant', 'aria-busy': 'true' },
        h('div', { class: 'bubble' },
          h('div', { class: 'meta' }, h('span', { class: 'role' }, 'Assistant'), h('span', { class: 'badge writing' }, 'writing…')),
          body, calls));
      d = { li, body, calls, content: '', refusal: '', toolCalls: [] };
      this.ol.append(li);
    }
    this.drafts.set(gen, d);
    return d;
  }

  // delta shows a fragment of a reply. Text is appended to the draft's
  // text nodes, never rewritten: a reply of n deltas costs the page O(n)
  // DOM work, not O(n^2) (a 5,000-delta reply rewritten per delta wrote
  // 44x its length into the page when the watch did not merge deltas).
  delta(ev) {
    const d = this.draft(ev.generation);
    d.text ||= d.body.appendChild(document.createTextNode(''));
    const shown = d.content;
    if (ev.replace) {
      d.content = ev.content || '';
      d.refusal = ev.refusal || '';
      d.toolCalls = [];
      clear(d.calls);
    } else {
      d.content += ev.content || '';
      d.refusal += ev.refusal || '';
    }
    if (!ev.replace && shown !== '') {
      if (ev.content) d.text.appendData(ev.content);
    } else {
      d.text.data = d.content || (d.refusal ? 'Refused: ' + d.refusal : '');
    }
    for (const tc of ev.tool_calls || []) {
      const i = tc.index || 0;
      let c = d.toolCalls[i];
      if (!c) {
        c = d.toolCalls[i] = { name: '', nameEl: h('code', null, '…'), args: document.createTextNode('') };
        d.calls.append(h('div', { class: 'toolcall pending' },
          h('div', { class: 'call-name' }, 'Tool call · ', c.nameEl),
          h('pre', { class: 'args' }, c.args)));
      }
      if (tc.name) {
        c.name += tc.name;
        c.nameEl.textContent = c.name;
      }
      if (tc.arguments) c.args.appendData(tc.arguments);
    }
  }

  // complete ends a generation: its draft goes (its reply, if recorded,
  // is shown as a message by now).
  complete(gen) {
    for (const [g, d] of [...this.drafts]) {
      if (gen === null || g === gen || g === null) {
        d.li.remove();
        this.drafts.delete(g);
      }
    }
  }
}

const ROLES = { user: 'User', assistant: 'Assistant', tool: 'Tool result', system: 'System', developer: 'Developer' };

function text(e) {
  if (e.content !== null && e.content !== undefined) return e.content;
  if (Array.isArray(e.content_parts)) {
    return e.content_parts.map((p) => (p.type === 'text' ? p.text : `[${p.type}]`)).join('\n');
  }
  return '';
}

function renderEntry(e, calls) {
  const summary = e.kind === 'summary';
  const cls = ['msg', summary ? 'summary' : e.role];
  if (e.status && e.status !== 'complete') cls.push('incomplete');
  const meta = h('div', { class: 'meta' },
    h('span', { class: 'role' }, summary ? 'Summary of earlier turns' : ROLES[e.role] || e.role),
    e.name ? h('span', { class: 'muted' }, e.name) : null,
    clock(e.created_at),
    e.model ? h('span', { class: 'muted model' }, e.model) : null,
    e.tokens ? h('span', { class: 'muted' }, `${int(e.tokens)} tok`) : null,
    e.status && e.status !== 'complete' ? h('span', { class: 'badge warn', title: 'The reply ended before the model finished it (the stream was cut, or the client left).' }, e.status) : null);
  const bubble = h('div', { class: 'bubble' }, meta);
  const body = text(e);
  if (body) bubble.append(h('div', { class: 'body' }, body));
  if (e.refusal) bubble.append(h('div', { class: 'body refusal' }, 'Refused: ' + e.refusal));
  if (e.role === 'tool') bubble.append(h('div', { class: 'muted small' }, 'Answers call ', h('code', null, e.tool_call_id || '?')));
  let toolCalls = [];
  if (Array.isArray(e.tool_calls)) toolCalls = e.tool_calls;
  if (toolCalls.length) {
    const list = h('div', { class: 'calls' });
    for (const c of toolCalls) {
      const fn = c.function || {};
      const slot = h('div', { class: 'result' }, h('p', { class: 'muted small waiting' }, 'No result recorded yet.'));
      const details = h('details', { class: 'toolcall', 'data-call-id': c.id || '' },
        h('summary', null, 'Tool call · ', h('code', null, fn.name || c.type || 'call'), h('span', { class: 'muted small' }, ' ' + (c.id || ''))),
        h('div', { class: 'label' }, 'Arguments'),
        h('pre', { class: 'args' }, pretty(fn.arguments)),
        slot);
      if (c.id) calls.set(c.id, slot);
      list.append(details);
    }
    bubble.append(list);
  }
  if (e.usage) {
    const u = e.usage;
    bubble.append(h('div', { class: 'turn', title: `Prompt ${int(u.prompt_tokens)} tokens (${int(u.history_tokens)} of history, ${int(u.cached_tokens)} cached), completion ${int(u.completion_tokens)}` },
      `Turn: ${int(u.prompt_tokens)} in · ${int(u.completion_tokens)} out · ${usd(u.cost_usd)}`));
  }
  return h('li', { class: cls.join(' '), 'data-id': e.id, 'data-role': e.role, 'data-kind': e.kind }, bubble);
}

function fillResult(slot, e) {
  clear(slot);
  slot.classList.add('filled');
  slot.dataset.id = e.id;
  slot.append(h('div', { class: 'label' }, 'Result', e.status && e.status !== 'complete' ? ' (' + e.status + ')' : ''),
    h('pre', { class: 'output' }, text(e)));
  const details = slot.closest('details');
  if (details) details.classList.add('answered');
}

function pretty(args) {
  if (!args) return '';
  try { return JSON.stringify(JSON.parse(args), null, 2); } catch { return args; }
}

async function doRename(ctx, view, refresh) {
  const d = view.detail;
  const conv = d.conversations.find((c) => c.id === view.shown);
  if (!conv) return;
  const r = await dialog({
    title: `Rename ${conv.id} of ${view.id}`,
    build: () => [
      h('label', { for: 'new-title' }, 'Title (empty: derived from the first message)'),
      h('input', { id: 'new-title', name: 'title', value: conv.title_set ? conv.title || '' : '', maxlength: '200', placeholder: conv.title || '' }),
    ],
    buttons: [{ value: 'cancel', label: 'Cancel', class: 'quiet' }, { value: 'save', label: 'Save', class: 'primary' }],
  });
  if (r.value !== 'save') return;
  try {
    await api(sessionPath(view.id, '/title'), { method: 'PUT', body: { title: String(r.data.get('title') || ''), conversation: conv.id }, signal: ctx.signal });
    toast('Title saved.');
    refresh(false);
  } catch (e) {
    failed(ctx, e);
  }
}

async function doReset(ctx, view, refresh) {
  const ok = await confirm({
    title: `Reset session ${view.id}?`,
    text: `This ends the active conversation of ${view.id}. It stays readable here; the next request starts a new conversation.`,
    yes: `Reset ${view.id}`,
  });
  if (!ok) return;
  try {
    const r = await api(sessionPath(view.id, '/reset'), { method: 'POST', signal: ctx.signal });
    toast(r.ended_conversation ? `Ended ${r.ended_conversation}.` : 'No conversation was going.');
    refresh(false);
  } catch (e) {
    failed(ctx, e);
  }
}

async function doCompact(ctx, view, button, refresh) {
  const ok = await confirm({
    title: `Compact session ${view.id}?`,
    text: `This summarizes the older turns of ${view.id}'s active conversation now, with a call to the upstream model. The messages are kept; the summary goes in the history sent upstream.`,
    yes: `Compact ${view.id}`,
  });
  if (!ok) return;
  button.disabled = true;
  try {
    const call = (key) => api(sessionPath(view.id, '/compact'), {
      method: 'POST', signal: ctx.signal, headers: key ? { 'X-Upstream-Authorization': 'Bearer ' + key } : undefined,
    });
    let res;
    try {
      res = await call('');
    } catch (e) {
      // The proxy holds no upstream key: the summarizing call needs one,
      // which only the operator at this page can give.
      if (!(e instanceof APIError && e.code === 'upstream_key_missing')) throw e;
      const key = await askUpstreamKey();
      if (!key) {
        toast('Not compacted: the server holds no upstream key and none was given.');
        return;
      }
      res = await call(key);
    }
    if (res && res.compacted === false) {
      // Nothing to fold (too few turns, say): the server says why.
      toast('Not compacted: ' + (res.reason || 'nothing to summarize yet.'));
    } else {
      toast('Compacted: the summary is in the transcript.');
    }
    refresh(false);
  } catch (e) {
    if (e instanceof APIError && e.status === 404 && e.code === 'unknown_url') {
      // This server has no compaction: the button goes.
      ctx.caps.compact = false;
      button.hidden = true;
      toast('This server cannot compact conversations.', 'error');
      return;
    }
    failed(ctx, e);
  } finally {
    button.disabled = false;
  }
}

// askUpstreamKey asks for the upstream API key a compaction's call needs
// when the server holds none; '' when cancelled. The key goes with that
// one call and is not kept.
async function askUpstreamKey() {
  const r = await dialog({
    title: 'Upstream API key',
    build: () => [
      h('p', null, 'This server holds no key for the upstream model (upstream.api_key_env), so the summarizing call needs yours. It is sent with this call only, in X-Upstream-Authorization, and not kept.'),
      h('label', { for: 'upstream-key' }, 'API key'),
      h('input', { id: 'upstream-key', name: 'key', type: 'password', autocomplete: 'off', required: true }),
    ],
    buttons: [{ value: 'cancel', label: 'Cancel', class: 'quiet' }, { value: 'send', label: 'Compact', class: 'primary' }],
  });
  if (r.value !== 'send') return '';
  return String(r.data.get('key') || '').trim().replace(/^Bearer\s+/i, '');
}

async function doErase(ctx, view) {
  const d = view.detail;
  const ok = await confirm({
    title: `Erase session ${view.id}?`,
    text: `This deletes everything ${view.id} has, for good: its ${int(d.conversations.length)} conversation(s), ${int(d.message_count)} message(s) and totals. It cannot be undone.`,
    yes: `Erase ${view.id}`,
    danger: true,
  });
  if (!ok) return;
  try {
    const r = await api(sessionPath(view.id), { method: 'DELETE', signal: ctx.signal });
    toast(`Erased ${r.session}: ${int(r.conversations)} conversation(s), ${int(r.messages)} message(s).`);
    ctx.navigate('#/sessions');
  } catch (e) {
    failed(ctx, e);
  }
}

function failed(ctx, e) {
  if (e instanceof AuthError) ctx.needLogin('The token was refused; sign in again.');
  else if (e.name !== 'AbortError') toast(e.message, 'error');
}
