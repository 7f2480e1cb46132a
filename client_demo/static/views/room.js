// The open conversation's header (title, presence, block, mute, members
// button), the group members panel and the typing line.
import {removeMember} from '../actions.js';
import {page} from '../page.js';
import {otherMember} from '../store.js';
import {$, el, lastSeenText, paintAvatar, showError, userName} from '../util.js';
import {roomTitle} from './inbox.js';

export function renderRoomHeader() {
  const entry = page.state.rooms.get(page.state.current);
  if (!entry) return;
  const room = entry.room;
  const other = room.kind === 'dm' ? otherMember(page.state, room) : null;
  paintAvatar($('room-avatar'), roomTitle(room), other ? other.username : `group${room.id}`, room.kind === 'group');
  $('room-title').textContent = roomTitle(room);
  const dot = $('room-dot');
  if (other) {
    const p = page.state.presence.get(other.username);
    dot.hidden = false;
    dot.classList.toggle('online', !!(p && p.online));
    $('room-status').textContent = p ? `${lastSeenText(p)} · @${other.username}` : `@${other.username}`;
  } else {
    dot.hidden = true;
    $('room-status').textContent = membersSummary(room.members);
  }
  renderBlock(other);
  renderMute(entry);
  $('members-toggle').hidden = room.kind !== 'group';
  $('members-toggle').textContent = `Members (${room.members.length})`;
  if (room.kind !== 'group') toggleMembers(false);
  else renderMembers();
}

// How many members are in, and the first few by name: one line (CSS
// ellipsis cuts what does not fit), however big the group.
const NAMED_MEMBERS = 4;
export function membersSummary(members) {
  const count = `${members.length} ${members.length === 1 ? 'member' : 'members'}`;
  const named = members.slice(0, NAMED_MEMBERS).map(userName).join(', ');
  const rest = members.length - NAMED_MEMBERS;
  return rest > 0 ? `${count}: ${named} and ${rest} more` : `${count}: ${named}`;
}

// Muted rooms send no push notifications (and do not count in the title).
function renderMute(entry) {
  const button = $('mute-toggle');
  button.hidden = false;
  button.textContent = entry.muted ? 'Unmute' : 'Mute';
  button.classList.toggle('on', !!entry.muted);
  button.setAttribute('aria-pressed', String(!!entry.muted));
  button.title = entry.muted ? 'Muted: no notifications from this conversation. Click to unmute.'
    : 'Mute notifications from this conversation';
}

export function currentGroup() {
  const entry = page.state.rooms.get(page.state.current);
  return entry && entry.room.kind === 'group' ? entry.room : null;
}

export function toggleMembers(open) {
  const show = !!currentGroup() && (open === undefined ? $('members-panel').hidden : open);
  $('members-panel').hidden = !show;
  $('room').classList.toggle('members-open', show);
  $('members-toggle').setAttribute('aria-expanded', String(show));
  showError('members-error', '');
  if (show) renderMembers();
}

export function renderMembers() {
  const room = currentGroup();
  if (!room || $('members-panel').hidden) return;
  const me = page.state.me;
  const owner = !!me && room.owner_id === me.id;
  $('members-title').textContent = `Members (${room.members.length})`;
  $('rename-form').hidden = !owner;
  if (owner && document.activeElement !== $('rename-input')) $('rename-input').value = room.name || '';
  const items = room.members.map((u) => {
    const li = el('li', 'member');
    li.dataset.username = u.username;
    const av = el('div', 'avatar');
    paintAvatar(av, userName(u), u.username);
    const text = el('div', 'member-text');
    // A long name is cut short; "(you)" and the owner badge always show.
    const name = el('div', 'member-name');
    const label = el('span', 'member-label', userName(u));
    label.dir = 'auto';
    name.append(label);
    if (me && u.id === me.id) name.append(el('span', 'member-you', ' (you)'));
    if (u.id === room.owner_id) name.append(el('span', 'owner-badge', 'owner'));
    text.append(name, el('div', 'muted small', `@${u.username}`));
    li.append(av, text);
    if (owner && u.id !== me.id) {
      const remove = el('button', 'member-remove', 'Remove');
      remove.type = 'button';
      remove.title = `Remove @${u.username} from the group`;
      remove.addEventListener('click', () => removeMember(room.id, u, remove));
      li.append(remove);
    }
    return li;
  });
  $('members-list').replaceChildren(...items);
}

function renderBlock(other) {
  const button = $('block-toggle');
  const blocked = !!other && page.state.blocked.has(other.username);
  button.hidden = !other;
  button.textContent = blocked ? 'Unblock' : 'Block';
  button.classList.toggle('on', blocked);
  button.title = other ? `${blocked ? 'Unblock' : 'Block'} @${other.username}` : '';
  $('block-notice').hidden = !blocked;
  $('block-notice-text').textContent = blocked
    ? `You blocked ${userName(other)}. They can't message you; you can still write to them.` : '';
}

export function renderTyping() {
  const room = page.ui.typing.get(page.state.current);
  const names = room ? [...room.values()].map((t) => userName(t.user)) : [];
  let text = '';
  if (names.length === 1) text = `${names[0]} is typing…`;
  else if (names.length === 2) text = `${names[0]} and ${names[1]} are typing…`;
  else if (names.length > 2) text = 'Several people are typing…';
  $('typing').textContent = text;
}

