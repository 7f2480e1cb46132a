// A conversation's messages: day separators, bubbles with replies,
// attachments (thumbnails fetched with the token, shown as blob: URLs),
// reactions and their picker, receipts, and the sending/failed states.
// Rendered <li> nodes are reused while their message is unchanged.
// Names and bodies take their direction from their own text (dir=auto):
// a Hebrew or Arabic message reads right to left in an English page.
import {deleteMessage, sendPending, startEdit, startReply, toggleReaction} from '../composer.js';
import {page} from '../page.js';
import {discardPending, timeline} from '../store.js';
import {$, clock, dayLabel, el, humanSize, sameDay, snippet, userName} from '../util.js';

// The quick reactions offered by the picker (any emoji works on the wire).
const REACTIONS = ['👍', '❤️', '😂', '😮', '😢'];

function seenLabel(c, room, myLast) {
  if (!myLast || myLast.pending) return '';
  const others = room.members.filter((u) => u.id !== page.state.me.id);
  const seen = others.filter((u) => (c.read[u.id] || 0) >= myLast.seq);
  if (!seen.length) return '';
  if (room.kind === 'dm') return 'Seen';
  if (seen.length === others.length) return 'Seen by everyone';
  return `Seen by ${seen.map(userName).join(', ')}`;
}

export function renderMessages(scroll) {
  const roomId = page.state.current;
  const box = $('messages');
  const list = $('message-list');
  const c = page.state.convos.get(roomId);
  const entry = page.state.rooms.get(roomId);
  if (!c || !entry) {
    list.replaceChildren();
    $('history-status').textContent = 'Loading…';
    return;
  }
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
  const heightBefore = box.scrollHeight;
  const topBefore = box.scrollTop;
  const items = timeline(c);
  // Receipts go under my last message that the server has (not one still
  // sending or refused).
  const myLast = [...items].reverse().find((m) => m.sender.id === page.state.me.id && !m.deleted && m.id);
  const seen = seenLabel(c, entry.room, myLast);
  const nodes = [];
  let prev = null;
  for (const m of items) {
    const date = new Date(m.created_at);
    if (!prev || !sameDay(new Date(prev.created_at), date)) {
      const day = el('li', 'day');
      day.append(el('span', null, dayLabel(date)));
      nodes.push(day);
    }
    const first = !prev || prev.sender.id !== m.sender.id
      || new Date(m.created_at) - new Date(prev.created_at) > 5 * 60000
      || !sameDay(new Date(prev.created_at), date);
    const key = m.id ? `m${m.id}` : `p${m.client_msg_id}`;
    const showSeen = m === myLast ? seen : '';
    // The quoted original, when it is loaded (its changes show in the quote).
    const orig = m.reply_to ? c.messages.get(m.reply_to) || null : null;
    const version = [m.update_seq, m.edited_at, m.deleted, m.status, m.error, m.final, first, showSeen,
      entry.room.kind, JSON.stringify(m.reactions || {}), page.ui.picker === m.id,
      orig ? `${orig.update_seq || orig.seq}` : ''].join('|');
    let node = page.ui.nodes.get(key);
    if (!node || node.dataset.version !== version) {
      node = renderMessage(m, first, showSeen, entry.room, orig);
      node.dataset.version = version;
      page.ui.nodes.set(key, node);
    }
    nodes.push(node);
    prev = m;
  }
  // Moving the nodes takes the focus away (a bubble tapped to show its
  // actions, a reaction chip): give it back.
  const focused = list.contains(document.activeElement) ? document.activeElement : null;
  list.replaceChildren(...nodes);
  if (focused && focused.isConnected && document.activeElement !== focused) {
    focused.focus({preventScroll: true});
  }
  $('history-status').textContent = c.loadingOlder ? 'Loading earlier messages…'
    : (c.loaded && !c.hasMore && items.length ? 'This is the start of the conversation.'
      : (c.loaded && !items.length ? 'No messages yet. Say hello!' : ''));
  if (scroll === 'bottom' || (scroll === 'keep' && atBottom)) box.scrollTop = box.scrollHeight;
  else if (scroll === 'older') box.scrollTop = topBefore + (box.scrollHeight - heightBefore);
}

function renderMessage(m, first, seen, room, orig) {
  const mine = m.sender.id === page.state.me.id;
  const li = el('li', 'msg');
  li.classList.toggle('mine', mine);
  li.classList.toggle('first', first);
  li.classList.toggle('deleted', !!m.deleted);
  li.classList.toggle('pending', m.status === 'sending');
  li.classList.toggle('failed', m.status === 'failed');
  if (m.id) li.dataset.id = m.id;
  li.dataset.cmid = m.client_msg_id || '';
  if (first && !mine && room.kind === 'group') li.append(textOf('div', 'msg-sender', userName(m.sender)));

  const row = el('div', 'msg-row');
  const bubble = el('div', 'bubble');
  if (!m.deleted && m.id) {
    // The Tab key shows the message's actions (CSS :focus-within); so
    // does a tap on a touch screen, which has no hover (.selected).
    bubble.tabIndex = 0;
    bubble.addEventListener('click', () => select(li));
  }
  if (m.deleted) {
    bubble.append(el('div', 'body', 'This message was deleted'));
  } else {
    if (m.reply_to) bubble.append(renderQuote(orig));
    const atts = el('div', 'attachments');
    for (const a of m.attachments || []) atts.append(renderAttachment(a));
    if ((m.attachments || []).some((a) => a.content_type.startsWith('image/'))) bubble.classList.add('has-image');
    bubble.append(atts);
    if (m.body) bubble.append(textOf('div', 'body', m.body));
    else if (!m.reply_to && (m.attachments || []).every((a) => a.content_type.startsWith('image/'))) {
      bubble.classList.add('bare');
    }
  }
  row.append(bubble);
  if (!m.deleted && m.id) {
    const actions = el('div', 'actions');
    const reactBtn = actionButton('react-open', '☺', `React to ${mine ? 'your' : 'this'} message`,
      () => togglePicker(m.id));
    reactBtn.setAttribute('aria-expanded', String(page.ui.picker === m.id));
    const reply = actionButton('reply', 'Reply', 'Reply to this message', () => startReply(m));
    actions.append(reactBtn, reply);
    if (mine) {
      actions.append(actionButton('edit', 'Edit', 'Edit this message', () => startEdit(m)),
        actionButton('delete', 'Delete', 'Delete this message', () => deleteMessage(m)));
    }
    row.append(actions);
  }
  li.append(row);
  if (!m.deleted && m.id) {
    const reactions = renderReactions(m, room);
    if (reactions) li.append(reactions);
    if (page.ui.picker === m.id) li.append(renderPicker(m));
  }

  let meta = clock(new Date(m.created_at));
  if (m.edited_at && !m.deleted) meta += ' · edited';
  if (m.status === 'sending') meta = 'Sending…';
  li.append(el('div', 'meta', meta));
  if (m.status === 'failed') li.append(renderFailure(m));
  if (seen) li.append(el('div', 'seen', seen));
  return li;
}

// One message at a time shows its actions on a touch screen: a tap on
// its bubble, and again to hide them.
function select(li) {
  for (const other of document.querySelectorAll('#message-list .msg.selected')) {
    if (other !== li) other.classList.remove('selected');
  }
  li.classList.toggle('selected');
}

// Under a refused send: why, Retry when sending again may work, Discard.
function renderFailure(m) {
  const box = el('div', 'failure small');
  box.append(el('span', 'failure-text', `Not sent: ${m.error || 'error'}.`
    + (m.final ? " It can't be sent as it is." : '')));
  if (!m.final) {
    box.append(' ', actionButton('retry link', 'Retry', 'Send this message again', () => sendPending(m)));
  }
  box.append(' ', actionButton('discard link', 'Discard', 'Remove this unsent message', () => {
    discardPending(page.state, m);
    page.ui.nodes.delete(`p${m.client_msg_id}`);
    renderMessages('keep');
  }));
  return box;
}

// A text element whose direction comes from its own text.
function textOf(tag, cls, text) {
  const node = el(tag, cls, text);
  node.dir = 'auto';
  return node;
}

export function actionButton(cls, label, title, onClick) {
  const button = el('button', cls, label);
  button.type = 'button';
  button.title = title;
  if (label.length <= 2) button.setAttribute('aria-label', title);
  button.addEventListener('click', onClick);
  return button;
}

// The quote on top of a reply: the original when loaded (a button that
// scrolls to it), otherwise a plain "earlier message".
function renderQuote(orig) {
  const quote = el(orig ? 'button' : 'div', 'quote');
  if (orig) {
    quote.type = 'button';
    quote.title = 'Show the original message';
    quote.addEventListener('click', () => scrollToMessage(orig.id));
    const sender = orig.sender.id === page.state.me.id ? 'You' : userName(orig.sender);
    quote.append(textOf('span', 'quote-sender', sender), textOf('span', 'quote-text', snippet(orig)));
  } else {
    quote.classList.add('missing');
    quote.append(el('span', 'quote-text', 'Reply to an earlier message'));
  }
  return quote;
}

export function scrollToMessage(id) {
  const node = document.querySelector(`#message-list .msg[data-id="${Number(id)}"]`);
  if (!node) return;
  node.scrollIntoView({block: 'center', behavior: 'smooth'});
  node.classList.remove('flash');
  void node.offsetWidth;  // restart the highlight animation
  node.classList.add('flash');
}

// Reactions under a message: emoji and count, pressed when one is mine;
// a click toggles mine.
function renderReactions(m, room) {
  const entries = Object.entries(m.reactions || {}).filter(([, users]) => users && users.length);
  if (!entries.length) return null;
  const box = el('div', 'reactions');
  for (const [emoji, users] of entries) {
    const mine = users.includes(page.state.me.id);
    const chip = el('button', 'reaction');
    chip.type = 'button';
    chip.classList.toggle('mine', mine);
    chip.setAttribute('aria-pressed', String(mine));
    chip.append(el('span', 'reaction-emoji', emoji), ' ', el('span', 'reaction-count', String(users.length)));
    const names = users.map((id) => (id === page.state.me.id ? 'You'
      : userName(room.members.find((u) => u.id === id))));
    chip.title = `${names.join(', ')} reacted with ${emoji}`
      + (mine ? ' (click to remove yours)' : ' (click to add yours)');
    chip.addEventListener('click', () => toggleReaction(m, emoji));
    box.append(chip);
  }
  return box;
}

function renderPicker(m) {
  const picker = el('div', 'picker');
  picker.setAttribute('role', 'group');
  picker.setAttribute('aria-label', 'Reactions');
  for (const emoji of REACTIONS) {
    const mine = ((m.reactions || {})[emoji] || []).includes(page.state.me.id);
    const button = actionButton('pick', emoji, `React with ${emoji}`, () => toggleReaction(m, emoji));
    button.classList.toggle('mine', mine);
    button.setAttribute('aria-pressed', String(mine));
    picker.append(button);
  }
  return picker;
}

export function togglePicker(id) {
  page.ui.picker = page.ui.picker === id ? null : id;
  renderMessages('keep');
  const first = document.querySelector('#message-list .picker .pick');
  if (first) first.focus();
}

export function closePicker() {
  if (page.ui.picker === null) return;
  page.ui.picker = null;
  if (page.state.current) renderMessages('keep');
}

function renderAttachment(a) {
  // Only the server's thumbnail is shown in the page: an image without
  // one is too big to decode safely (it may be a decompression bomb) and
  // is a download like any other file.
  if (a.content_type.startsWith('image/') && a.thumbnail_url) {
    const img = el('img', 'att-image');
    img.alt = a.filename;
    if (a.width && a.height) {
      const scale = Math.min(1, 320 / a.width, 320 / a.height);
      img.width = Math.round(a.width * scale);
      img.height = Math.round(a.height * scale);
    }
    // The thumbnail, never the original: a small file can still decode
    // to gigabytes. Clicking opens the original.
    blobUrl(a.thumbnail_url).then((url) => {
      const box = $('messages');
      const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
      img.addEventListener('load', () => { if (atBottom) box.scrollTop = box.scrollHeight; }, {once: true});
      img.src = url;
    }, () => { img.alt = `${a.filename} (could not load)`; });
    img.addEventListener('click', () => showImage(a));
    return img;
  }
  const link = el('a', 'att-file');
  link.href = '#';
  link.title = `Download ${a.filename}`;
  const ext = (a.filename.split('.').pop() || 'file').slice(0, 4);
  const text = el('div');
  text.append(el('div', 'att-name', a.filename), el('div', 'att-size', humanSize(a.size)));
  link.append(el('div', 'att-icon', ext), text);
  link.addEventListener('click', async (event) => {
    event.preventDefault();
    try {
      const save = el('a');
      save.href = await blobUrl(a.url);
      save.download = a.filename;
      save.click();
    } catch (err) { /* the link stays; the user can try again */ }
  });
  return link;
}

// Attachment URLs need the Authorization header, so images and downloads
// are fetched and shown from blob: URLs (kept for the session).
export function blobUrl(url) {
  if (!page.ui.blobs.has(url)) {
    const p = fetch(url, {headers: {Authorization: `Bearer ${page.token}`}})
      .then((res) => {
        if (!res.ok) throw new Error(`HTTP ${res.status}`);
        return res.blob();
      })
      .then((blob) => URL.createObjectURL(blob));
    p.catch(() => page.ui.blobs.delete(url));
    page.ui.blobs.set(url, p);
  }
  return page.ui.blobs.get(url);
}

async function showImage(a) {
  const overlay = el('div', 'lightbox');
  overlay.style.cssText = 'position:fixed;inset:0;background:rgba(10,14,30,.82);display:grid;'
    + 'place-items:center;z-index:20;cursor:zoom-out';
  const img = el('img');
  img.style.cssText = 'max-width:92vw;max-height:92vh;border-radius:8px';
  img.alt = a.filename;
  overlay.append(img);
  overlay.addEventListener('click', () => overlay.remove());
  document.body.append(overlay);
  try { img.src = await blobUrl(a.url); } catch (err) { overlay.remove(); }
}

