// The inbox: one line per conversation, latest activity first, with its
// unread badge, presence dot and muted mark; more pages on demand.
import {openRoom} from '../app.js';
import {page} from '../page.js';
import {inbox, otherMember, totalUnread} from '../store.js';
import {$, el, paintAvatar, shortTime, userName} from '../util.js';

export function roomTitle(room) {
  if (room.kind === 'dm') return userName(otherMember(page.state, room));
  return room.name || room.members.map(userName).join(', ');
}

// The inbox line's preview: who (me, or a group's sender) and what, each
// in its own direction (a Hebrew message from "You" still reads right to
// left).
function preview(entry) {
  const line = el('span', 'inbox-preview');
  const m = entry.last_message;
  if (!m) {
    line.textContent = 'No messages yet';
    return line;
  }
  const me = page.state.me;
  let text;
  if (m.deleted) text = 'Message deleted';
  else if (m.body) text = m.body.replace(/\s+/g, ' ');
  else if (m.attachments && m.attachments.length) {
    const a = m.attachments[0];
    text = a.content_type.startsWith('image/') ? 'Photo' : a.filename;
  } else text = '';
  let who = null;
  if (me && m.sender.id === me.id) who = 'You';
  else if (entry.room.kind === 'group') who = userName(m.sender);
  if (who) line.append(el('bdi', null, who), ': ');
  line.append(el('bdi', null, text));
  return line;
}

export function renderInbox() {
  const state = page.state;
  const entries = inbox(state);
  const items = entries.map((entry) => {
    const room = entry.room;
    const li = el('li', 'inbox-item');
    li.dataset.roomId = room.id;
    li.classList.toggle('active', room.id === state.current);
    li.classList.toggle('unread', entry.unread > 0);
    li.classList.toggle('muted-room', !!entry.muted);
    const wrap = el('div', 'avatar-wrap');
    const av = el('div', 'avatar');
    const other = room.kind === 'dm' ? otherMember(state, room) : null;
    paintAvatar(av, roomTitle(room), other ? other.username : `group${room.id}`, room.kind === 'group');
    wrap.append(av);
    if (other) {
      const dot = el('span', 'dot');
      const p = state.presence.get(other.username);
      dot.classList.toggle('online', !!(p && p.online));
      wrap.append(dot);
    }
    const main = el('div', 'inbox-main');
    const top = el('div', 'inbox-top');
    const name = el('span', 'inbox-name', roomTitle(room));
    name.dir = 'auto';
    top.append(name, el('span', 'inbox-time', shortTime(entry.last_message && entry.last_message.created_at)));
    const bottom = el('div', 'inbox-bottom');
    bottom.append(preview(entry));
    if (entry.muted) {
      const mark = el('span', 'muted-mark', '🔕');
      mark.title = 'Muted: no notifications';
      bottom.append(mark);
    }
    if (entry.unread > 0) bottom.append(el('span', 'badge', entry.unread > 99 ? '99+' : String(entry.unread)));
    main.append(top, bottom);
    li.append(wrap, main);
    li.addEventListener('click', () => openRoom(room.id));
    return li;
  });
  // "More conversations" stays the list's last line, under the last row.
  const more = $('inbox-more');
  $('inbox').replaceChildren(...items, more.parentElement);
  $('inbox').classList.toggle('no-rooms', !entries.length);
  more.hidden = more.parentElement.hidden = !state.inboxMore;
  more.disabled = page.ui.loadingInbox;
  $('inbox-empty').hidden = entries.length > 0 || state.inboxMore;
  // Rooms on pages not loaded yet may have unread messages too.
  const unread = totalUnread(state);
  document.title = unread ? `(${unread}${state.inboxMore ? '+' : ''}) Postbox` : 'Postbox';
}
