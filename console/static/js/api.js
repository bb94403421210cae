// The conversations API, called with the admin token from session storage
// as a bearer header. The token never goes into a URL or a cookie.

const KEY = 'historyproxy.admin-token';
const BASE = '/admin/v1';

export class AuthError extends Error {
  constructor() { super('the admin API wants a valid token'); this.name = 'AuthError'; }
}

export class APIError extends Error {
  constructor(status, message, code) {
    super(message);
    this.name = 'APIError';
    this.status = status;
    this.code = code || '';
  }
}

export function token() {
  try { return sessionStorage.getItem(KEY) || ''; } catch { return ''; }
}

export function setToken(t) { sessionStorage.setItem(KEY, t); }
export function clearToken() { sessionStorage.removeItem(KEY); }

// authHeaders are the headers every call sends.
export function authHeaders(extra) {
  const h = new Headers(extra);
  const t = token();
  if (t) h.set('Authorization', 'Bearer ' + t);
  return h;
}

// path escapes a session id for a route's path.
export function sessionPath(id, rest = '') {
  return '/sessions/' + encodeURIComponent(id) + rest;
}

// api calls a route and gives its JSON answer. A 401 throws AuthError;
// another error status throws APIError with the answer's message. headers
// are added to the call's own.
export async function api(path, { method = 'GET', body, signal, headers: extra } = {}) {
  const headers = authHeaders({ Accept: 'application/json', ...extra });
  const init = { method, headers, signal, cache: 'no-store', credentials: 'omit', referrerPolicy: 'no-referrer' };
  if (body !== undefined) {
    headers.set('Content-Type', 'application/json');
    init.body = JSON.stringify(body);
  }
  const resp = await fetch(BASE + path, init);
  if (resp.status === 401) throw new AuthError();
  const text = await resp.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = null; }
  if (!resp.ok) {
    const e = data && data.error;
    throw new APIError(resp.status, (e && e.message) || `${method} ${path}: ${resp.status} ${resp.statusText}`, e && e.code);
  }
  return data;
}

export const watchURL = (id) => BASE + sessionPath(id, '/watch');
