// Small DOM and formatting helpers shared by the views. User data only
// ever goes into the page as text (textContent, attributes), never parsed
// as HTML.

export const $ = (id) => document.getElementById(id);

export function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined && text !== null) node.textContent = text;
  return node;
}

export function showError(id, text) {
  const node = $(id);
  node.textContent = text || '';
  node.hidden = !text;
}

// The first grapheme of a word: a whole emoji (with its skin tone or ZWJ
// sequence) or a letter with its accents, never half of a surrogate pair.
const graphemes = typeof Intl !== 'undefined' && Intl.Segmenter
  ? new Intl.Segmenter(undefined, {granularity: 'grapheme'}) : null;
function firstGrapheme(word) {
  if (graphemes) return graphemes.segment(word)[Symbol.iterator]().next().value.segment;
  return Array.from(word)[0];
}

function initials(name) {
  const parts = (name || '?').trim().split(/[\s._]+/).filter(Boolean);
  return (firstGrapheme(parts[0] || '?') + (parts[1] ? firstGrapheme(parts[1]) : '')).toUpperCase();
}

const PALETTE = ['#5b6cf0', '#e0607e', '#1fa38a', '#f08a3c', '#8a5cf0',
  '#2f96d8', '#c9527a', '#4b9a48', '#d6703a', '#6a74a0'];
function colorFor(key) {
  let h = 0;
  for (const ch of String(key)) h = (h * 31 + ch.charCodeAt(0)) >>> 0;
  return PALETTE[h % PALETTE.length];
}

export function paintAvatar(node, label, key, group) {
  node.textContent = initials(label);
  node.style.background = colorFor(key);
  node.classList.toggle('group', !!group);
}

export function userName(user) {
  return (user && (user.display_name || user.username)) || 'Someone';
}

export function sameDay(a, b) {
  return a.getFullYear() === b.getFullYear() && a.getMonth() === b.getMonth()
    && a.getDate() === b.getDate();
}

export function clock(date) {
  return date.toLocaleTimeString([], {hour: '2-digit', minute: '2-digit'});
}

export function shortTime(iso) {
  if (!iso) return '';
  const d = new Date(iso);
  const now = new Date();
  if (sameDay(d, now)) return clock(d);
  if (now - d < 6 * 864e5) return d.toLocaleDateString([], {weekday: 'short'});
  return d.toLocaleDateString([], {month: 'short', day: 'numeric'});
}

export function dayLabel(date) {
  const now = new Date();
  if (sameDay(date, now)) return 'Today';
  if (sameDay(date, new Date(now - 864e5))) return 'Yesterday';
  return date.toLocaleDateString([], {weekday: 'long', month: 'long', day: 'numeric'});
}

export function lastSeenText(p) {
  if (!p) return '';
  if (p.online) return 'Online';
  if (!p.last_seen) return 'Offline';
  const d = new Date(p.last_seen);
  const mins = Math.round((Date.now() - d) / 60000);
  if (mins < 1) return 'Last seen just now';
  if (mins < 60) return `Last seen ${mins} min ago`;
  if (sameDay(d, new Date())) return `Last seen today at ${clock(d)}`;
  return `Last seen ${d.toLocaleDateString([], {month: 'short', day: 'numeric'})}`;
}

export function humanSize(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(0)} KB`;
  return `${(n / 1048576).toFixed(1)} MB`;
}

const SNIPPET_CHARS = 90;

// One line of text standing for a message (quotes, the reply bar).
export function snippet(m) {
  if (m.deleted) return 'Deleted message';
  if (m.body) {
    // By code point: a cut never splits an emoji's surrogate pair.
    const chars = Array.from(m.body.replace(/\s+/g, ' ').trim());
    return chars.length > SNIPPET_CHARS ? `${chars.slice(0, SNIPPET_CHARS - 1).join('')}…` : chars.join('');
  }
  const a = (m.attachments || [])[0];
  if (a) return a.content_type.startsWith('image/') ? 'Photo' : a.filename;
  return '';
}

// A username as typed: trimmed, folded, one leading "@" dropped ("@bob").
export function typedUsername(text) {
  return text.trim().replace(/^@/, '').toLowerCase();
}

export function splitNames(text) {
  return text.split(/[\s,]+/).map(typedUsername).filter(Boolean);
}

// A server error in words for people: the messages that name a payload
// field ("name: 1 to 100 characters") said plainly, the rest as a
// sentence.
export function friendly(err) {
  const text = (err && err.message) || String(err || 'Something went wrong.');
  const missing = /^no such user: (.+)$/.exec(text);
  if (missing) return `No user named ${missing[1]}.`;
  if (/^usernames?: /.test(text)) return 'A username is 3 to 32 characters: a-z, 0-9, _ and .';
  if (/^name: /.test(text)) return 'A group name is 1 to 100 characters.';
  const long = /^body: at most (\d+) characters$/.exec(text);
  if (long) return `A message can be at most ${long[1]} characters.`;
  // "display_name: 1 to 64 characters" -> "Display name: 1 to 64 characters."
  const plain = text.replace(/^([a-z]+(?:_[a-z]+)+):/, (field) => field.replace(/_/g, ' '));
  const sentence = plain.charAt(0).toUpperCase() + plain.slice(1);
  return /[.!?…]$/.test(sentence) ? sentence : `${sentence}.`;
}
