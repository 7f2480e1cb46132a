// Postbox demo client: message search (GET /api/search). A native ES
// module of its own: it searches with this tab's session (page.js: another
// tab may have signed in as someone else since) and asks app.js to show a
// message by dispatching `postbox:show-message` ({room_id, id}) on window.
// User text only ever goes into the page as text nodes; the match is
// wrapped in <mark> elements made here.
import {api, page} from './page.js';
import {userName} from './util.js';
import {roomTitle} from './views/inbox.js';

const PAGE = 20;
// Accents on Latin, Greek and Cyrillic letters, as the server drops them.
const ACCENTS = /[\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f]/g;
const SEPARATORS = /[\p{P}\p{Z}\p{Cc}]+/u;

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined && text !== null) node.textContent = text;
  return node;
}

// As the server folds (Python's casefold, where toLowerCase differs: ß).
const CASEFOLD = {'ß': 'ss', 'ẞ': 'ss', 'ς': 'σ', 'ſ': 's'};

function fold(text) {
  return text.normalize('NFKD').replace(ACCENTS, '').toLowerCase()
    .replace(/[ßẞςſ]/g, (ch) => CASEFOLD[ch]).normalize('NFKC');
}

// The body split into [text, matched] pieces: every occurrence of a query
// word, compared folded (each original character folded on its own, so a
// match maps back to the characters it came from).
export function pieces(body, query) {
  const words = fold(query).split(SEPARATORS).filter(Boolean);
  const chars = Array.from(body);
  let folded = '';
  const origin = [];  // folded UTF-16 index -> index in chars
  chars.forEach((ch, i) => {
    const f = fold(ch);
    folded += f;
    for (let k = 0; k < f.length; k++) origin.push(i);
  });
  const marked = new Array(chars.length).fill(false);
  for (const word of words) {
    for (let at = folded.indexOf(word); at !== -1; at = folded.indexOf(word, at + 1)) {
      for (let k = at; k < at + word.length; k++) marked[origin[k]] = true;
    }
  }
  const out = [];
  chars.forEach((ch, i) => {
    const last = out[out.length - 1];
    if (last && last[1] === marked[i]) last[0] += ch;
    else out.push([ch, marked[i]]);
  });
  return out;
}

function highlighted(body, query) {
  const span = el('span', 'search-body');
  span.dir = 'auto';
  for (const [text, match] of pieces(body, query)) {
    span.append(match ? el('mark', null, text) : document.createTextNode(text));
  }
  return span;
}

function when(iso) {
  const d = new Date(iso);
  return d.toLocaleDateString([], {month: 'short', day: 'numeric'}) + ' ' +
    d.toLocaleTimeString([], {hour: '2-digit', minute: '2-digit'});
}

function fetchPage(query, before) {
  const params = new URLSearchParams({q: query, limit: String(PAGE)});
  if (before) params.set('before', String(before));
  return api('GET', `/api/search?${params}`);
}

// Rooms of results that the inbox has not loaded (its pages come on
// demand): asked once per session (GET /api/rooms/{id}).
const fetched = new WeakMap();  // state -> Map(room id -> Promise of a room, or null)

function fetchRoom(roomId) {
  const state = page.state;
  let rooms = fetched.get(state);
  if (!rooms) fetched.set(state, rooms = new Map());
  if (!rooms.has(roomId)) {
    rooms.set(roomId, api('GET', `/api/rooms/${roomId}`).then((answer) => answer.room, () => {
      rooms.delete(roomId);  // offline, say: the next search asks again
      return null;
    }));
  }
  return rooms.get(roomId);
}

// Which conversation a result is from: its inbox title (a group's name,
// the other person of a dm), from the inbox or else from the server.
function labelConversation(node, roomId) {
  const entry = page.state.rooms.get(roomId);
  if (entry) {
    node.textContent = roomTitle(entry.room);
    return;
  }
  node.textContent = '…';
  fetchRoom(roomId).then((room) => {
    node.textContent = room ? roomTitle(room) : 'Another conversation';
  });
}

function build() {
  const form = el('form', 'search-form');
  form.id = 'search-form';
  form.setAttribute('role', 'search');
  const input = el('input');
  input.id = 'search-input';
  input.type = 'search';
  input.placeholder = 'Search messages…';
  input.setAttribute('aria-label', 'Search messages');
  input.maxLength = 200;
  const panel = el('div', 'search-panel');
  panel.id = 'search-panel';
  panel.hidden = true;
  const status = el('p', 'search-status muted small');
  status.id = 'search-status';
  status.setAttribute('role', 'status');
  const list = el('ul', 'search-results');
  list.id = 'search-results';
  const more = el('button', 'link small search-more', 'More results');
  more.type = 'button';
  more.hidden = true;
  panel.append(status, list, more);
  form.append(input);
  return {form, input, panel, status, list, more};
}

function start() {
  const inbox = document.getElementById('inbox');
  const title = document.querySelector('.inbox-title');
  if (!inbox || !title) return;
  const ui = build();
  title.before(ui.form, ui.panel);
  let query = '';
  let last = null;  // id of the last result shown (the next page's `before`)
  let serial = 0;   // answers to an older query are dropped

  function close() {
    ui.panel.hidden = true;
    ui.list.replaceChildren();
  }

  function show(results) {
    for (const m of results) {
      const li = el('li', 'search-result');
      li.tabIndex = 0;
      li.dataset.id = m.id;
      const head = el('div', 'search-head small');
      const room = el('strong', 'search-room');
      labelConversation(room, m.room_id);
      room.dir = 'auto';
      const mine = page.state.me && m.sender.id === page.state.me.id;
      const sender = el('span', 'muted', mine ? 'You' : userName(m.sender));
      sender.dir = 'auto';
      head.append(room, el('span', 'muted', ' · '), sender,
        el('span', 'muted', ` · ${when(m.created_at)}`));
      li.append(head, highlighted(m.body, query));
      const open = () => {
        window.dispatchEvent(new CustomEvent('postbox:show-message', {
          detail: {room_id: m.room_id, id: m.id},
        }));
      };
      li.addEventListener('click', open);
      li.addEventListener('keydown', (event) => { if (event.key === 'Enter') open(); });
      ui.list.append(li);
    }
  }

  async function run(before) {
    const mine = ++serial;
    ui.status.textContent = 'Searching…';
    ui.more.hidden = true;
    try {
      const data = await fetchPage(query, before);
      if (mine !== serial) return;
      show(data.results);
      if (data.results.length) last = data.results[data.results.length - 1].id;
      ui.more.hidden = !data.has_more;
      const count = ui.list.children.length;
      ui.status.textContent = count ? `${count}${data.has_more ? '+' : ''} found` : 'No messages found.';
    } catch (err) {
      if (mine === serial) ui.status.textContent = err.message;
    }
  }

  ui.form.addEventListener('submit', (event) => {
    event.preventDefault();
    query = ui.input.value.trim();
    ui.list.replaceChildren();
    last = null;
    if (!query) { close(); return; }
    ui.panel.hidden = false;
    if (query.length < 2) {
      ui.status.textContent = 'Type at least 2 characters.';
      return;
    }
    run(null);
  });
  ui.input.addEventListener('input', () => { if (!ui.input.value) close(); });
  ui.input.addEventListener('keydown', (event) => {
    if (event.key === 'Escape') { ui.input.value = ''; close(); }
  });
  ui.more.addEventListener('click', () => run(last));
}

if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
else start();
