// What the composer held for each room, kept in this tab's sessionStorage
// so that a reload does not lose a half-typed message. Keyed by the
// signed-in user's id and the room's id (another account signing in here
// never sees them) and cleared at sign-out. Storage that refuses (full,
// disabled) falls back to memory: the draft then lasts until the reload.

const PREFIX = 'postbox.draft.';
const memory = new Map();

function key(me, roomId) {
  return me && roomId ? `${PREFIX}${me.id}.${roomId}` : null;
}

function storage() {
  try {
    return window.sessionStorage;
  } catch (err) {
    return null;  // blocked by the browser's settings
  }
}

export function loadDraft(me, roomId) {
  const k = key(me, roomId);
  if (!k) return '';
  try {
    const text = storage()?.getItem(k);
    if (typeof text === 'string') return text;
  } catch (err) { /* memory below */ }
  return memory.get(k) || '';
}

// Saves `text` as the room's draft; an empty one removes it.
export function saveDraftText(me, roomId, text) {
  const k = key(me, roomId);
  if (!k) return;
  memory.delete(k);
  try {
    if (text) storage().setItem(k, text);
    else storage().removeItem(k);
  } catch (err) {
    if (text) memory.set(k, text);
  }
}

export function clearDraft(me, roomId) {
  saveDraftText(me, roomId, '');
}

// Every draft of this tab, whoever's (sign-out).
export function clearDrafts() {
  memory.clear();
  try {
    const store = storage();
    if (!store) return;
    const keys = [];
    for (let i = 0; i < store.length; i++) {
      const k = store.key(i);
      if (k && k.startsWith(PREFIX)) keys.push(k);
    }
    for (const k of keys) store.removeItem(k);
  } catch (err) { /* nothing stored */ }
}
