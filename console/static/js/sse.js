// follow reads a server-sent event stream with fetch, since EventSource
// cannot send an Authorization header. It does what EventSource does:
// parses the stream as the HTML standard says, remembers the id of the
// last event dispatched, and reconnects after a dropped connection with
// Last-Event-ID, so the server sends what was missed and nothing twice.
// A stream silent for idleMs (no event, no heartbeat) counts as dropped.
//
// onEvent({type, data, id}) is called for each event; onStatus(state) with
// 'connecting', 'open', 'reconnecting' or 'unauthorized' (it then stops).
// It stops when signal aborts.
export function follow(url, { headers, onEvent, onStatus, signal, idleMs = 45000 }) {
  let lastId = '';
  let retry = 2000;

  const sleep = (ms) => new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    signal.addEventListener('abort', () => { clearTimeout(t); resolve(); }, { once: true });
  });

  async function connect() {
    const ctrl = new AbortController();
    const stop = () => ctrl.abort();
    signal.addEventListener('abort', stop, { once: true });
    let watchdog = 0;
    const kick = () => {
      clearTimeout(watchdog);
      watchdog = setTimeout(() => ctrl.abort(), idleMs);
    };
    try {
      const h = headers();
      h.set('Accept', 'text/event-stream');
      if (lastId) h.set('Last-Event-ID', lastId);
      kick();
      const resp = await fetch(url, { headers: h, signal: ctrl.signal, cache: 'no-store', credentials: 'omit' });
      if (resp.status === 401) return 'unauthorized';
      if (resp.status === 400 && lastId) {
        // An id the server does not take: start again from a snapshot.
        lastId = '';
        return 'retry-now';
      }
      if (!resp.ok || !resp.body) return 'failed';
      onStatus('open');
      const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = '';
      let data = [];
      let type = '';
      let id = null;
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return 'ended';
        kick();
        buf += value;
        for (;;) {
          const i = buf.search(/[\r\n]/);
          if (i < 0) break;
          // A CR that ends the buffer may be the first half of a CRLF.
          if (buf[i] === '\r' && i === buf.length - 1) break;
          const line = buf.slice(0, i);
          buf = buf.slice(buf[i] === '\r' && buf[i + 1] === '\n' ? i + 2 : i + 1);
          if (line === '') {
            // Dispatch: only now does the event's id count as received,
            // so an event cut in the middle is asked for again.
            if (id !== null) lastId = id;
            if (data.length > 0) {
              try {
                onEvent({ type: type || 'message', data: data.join('\n'), id: lastId });
              } catch (err) {
                console.error('watch event', err);
              }
            }
            data = []; type = ''; id = null;
            continue;
          }
          if (line[0] === ':') continue; // a comment: the heartbeat
          const c = line.indexOf(':');
          const field = c < 0 ? line : line.slice(0, c);
          let val = c < 0 ? '' : line.slice(c + 1);
          if (val[0] === ' ') val = val.slice(1);
          if (field === 'data') data.push(val);
          else if (field === 'event') type = val;
          else if (field === 'id' && !val.includes('\0')) id = val;
          else if (field === 'retry' && /^\d+$/.test(val)) retry = Number(val);
        }
      }
    } catch {
      return 'failed';
    } finally {
      clearTimeout(watchdog);
      signal.removeEventListener('abort', stop);
    }
  }

  (async () => {
    let failures = 0;
    onStatus('connecting');
    while (!signal.aborted) {
      const how = await connect();
      if (signal.aborted) return;
      if (how === 'unauthorized') { onStatus('unauthorized'); return; }
      if (how === 'retry-now') continue;
      onStatus('reconnecting');
      failures = how === 'ended' ? 0 : failures + 1;
      await sleep(Math.min(retry * 2 ** Math.max(0, failures - 1), 30000));
    }
  })();
}
