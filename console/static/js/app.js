// The console's entry: the router (#/sessions, #/session/<id>, #/overview),
// the login form, and the pages' lifetimes.
import { api, AuthError, setToken, clearToken, token } from './api.js';
import { h, clear } from './dom.js';
import { sessionsPage } from './sessions.js';
import { conversationPage } from './conversation.js';
import { overviewPage } from './overview.js';

const main = document.getElementById('main');
const logout = document.getElementById('logout');
let caps = null; // the API's capabilities, once the token is good
let page = null; // the current page's AbortController
let loginError = '';
let first = true; // the first page shown: focus stays where the browser puts it

export function navigate(hash) {
  if (location.hash === hash) route();
  else location.hash = hash;
}

// needLogin shows the login form: the token is missing or was refused.
export function needLogin(message) {
  caps = null;
  if (page) page.abort();
  page = null;
  logout.hidden = true;
  loginError = message || '';
  showLogin();
}

function showLogin() {
  document.title = 'Sign in · historyproxy console';
  clear(main);
  const input = h('input', { id: 'token', name: 'token', type: 'password', autocomplete: 'current-password', required: true, spellcheck: 'false' });
  const err = h('p', { class: 'error', role: 'alert', id: 'login-error' }, loginError);
  const form = h('form', { class: 'login card', 'aria-describedby': 'login-help' },
    h('h1', null, 'Sign in'),
    h('p', { id: 'login-help' }, 'The console reads the conversations API with the admin token: the value of the variable that admin.token_env names. It stays in this tab only (session storage) and is sent as a bearer header.'),
    h('label', { for: 'token' }, 'Admin token'),
    input,
    err,
    h('button', { class: 'primary', type: 'submit' }, 'Sign in'));
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    setToken(input.value.trim());
    loginError = 'That token was refused.';
    route();
  });
  main.append(form);
  input.focus();
}

function parseHash() {
  const raw = location.hash.slice(1) || '/sessions';
  if (!raw.startsWith('/')) return null; // an anchor in the page (the skip link)
  const q = raw.indexOf('?');
  const path = q < 0 ? raw : raw.slice(0, q);
  const params = new URLSearchParams(q < 0 ? '' : raw.slice(q + 1));
  let parts;
  try { parts = path.split('/').filter(Boolean).map(decodeURIComponent); } catch { parts = []; }
  return { parts, params };
}

async function route() {
  const r = parseHash();
  if (!r) return;
  if (page) page.abort();
  const ctrl = new AbortController();
  page = ctrl;
  if (!caps) {
    try {
      caps = await api('/capabilities', { signal: ctrl.signal });
    } catch (e) {
      if (ctrl.signal.aborted) return;
      if (e instanceof AuthError) {
        if (!token()) loginError = '';
        needLogin(loginError);
        return;
      }
      showError(e);
      return;
    }
    loginError = '';
    logout.hidden = !caps.token_required;
  }
  if (ctrl.signal.aborted) return;
  const which = r.parts[0] || 'sessions';
  for (const a of document.querySelectorAll('[data-nav]')) {
    const current = a.dataset.nav === which || (which === 'session' && a.dataset.nav === 'sessions');
    if (current) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  const ctx = { main, params: r.params, caps, signal: ctrl.signal, navigate, needLogin };
  clear(main);
  main.setAttribute('aria-busy', 'true');
  try {
    switch (which) {
      case 'sessions': await sessionsPage(ctx); break;
      case 'session': await conversationPage(ctx, r.parts[1] || ''); break;
      case 'overview': await overviewPage(ctx); break;
      default:
        main.append(h('h1', null, 'Not found'), h('p', null, h('a', { href: '#/sessions' }, 'Go to the sessions')));
    }
  } catch (e) {
    if (ctrl.signal.aborted) return;
    if (e instanceof AuthError) { needLogin('The token was refused; sign in again.'); return; }
    showError(e);
  } finally {
    main.removeAttribute('aria-busy');
  }
  // After a change of page, focus goes to its heading, so a keyboard or
  // screen reader user starts there rather than on a control now gone.
  const heading = main.querySelector('h1');
  if (!first && heading && !ctrl.signal.aborted) {
    if (!heading.hasAttribute('tabindex')) heading.setAttribute('tabindex', '-1');
    heading.focus({ preventScroll: true });
  }
  first = false;
}

function showError(e) {
  clear(main);
  main.append(h('div', { class: 'card error-box', role: 'alert' },
    h('h1', null, 'Something went wrong'),
    h('p', null, e && e.message ? e.message : String(e)),
    h('p', null, h('button', { type: 'button', onclick: () => route() }, 'Try again'))));
}

logout.addEventListener('click', () => {
  clearToken();
  needLogin('Signed out.');
});
document.getElementById('skip').addEventListener('click', (ev) => {
  ev.preventDefault();
  main.focus();
});
window.addEventListener('hashchange', route);
route();
