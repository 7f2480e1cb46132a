// Rooms: starting dms and groups, the members panel's actions, blocking
// and muting. Each runs one ack'ed call and updates the view from its ack.
import {onRoom, onRoomLeft, openRoom} from './app.js';
import {showNotice} from './composer.js';
import {api, call, page} from './page.js';
import {applyMuted, otherMember} from './store.js';
import {$, friendly, showError, splitNames, typedUsername, userName} from './util.js';
import {renderInbox} from './views/inbox.js';
import {currentGroup, renderRoomHeader} from './views/room.js';

export async function startDm(event) {
  event.preventDefault();
  const username = typedUsername($('new-dm-username').value);
  if (!username) return;
  showError('sidebar-error', '');
  try {
    const ack = await call('open_dm', {username});
    $('new-dm-username').value = '';
    onRoom(ack.room);
    openRoom(ack.room.id);
  } catch (err) {
    showError('sidebar-error', err.code === 'not_found' ? `No user named “${username}”.`
      : err.code === 'forbidden' ? `@${username} isn't accepting messages from you.` : friendly(err));
  }
}

export async function createGroup(event) {
  event.preventDefault();
  const name = $('new-group-name').value.trim();
  const members = splitNames($('new-group-members').value);
  if (!name) {
    showError('sidebar-error', 'Give the group a name.');
    $('new-group-name').focus();
    return;
  }
  showError('sidebar-error', '');
  try {
    const ack = await call('create_group', {name, members});
    $('new-group-name').value = '';
    $('new-group-members').value = '';
    $('new-group').hidden = true;
    onRoom(ack.room);
    openRoom(ack.room.id);
  } catch (err) {
    showError('sidebar-error', friendly(err));
  }
}

// Runs one group event; its ack's room (if any) updates the view at once
// (the live `room` event that follows changes nothing more).
async function groupCall(event, data, button) {
  showError('members-error', '');
  if (button) button.disabled = true;
  try {
    const ack = await call(event, data);
    if (ack.room) onRoom(ack.room);
    return ack;
  } catch (err) {
    showError('members-error', friendly(err));
    return null;
  } finally {
    if (button) button.disabled = false;
  }
}

export async function addMembers(event) {
  event.preventDefault();
  const room = currentGroup();
  const members = splitNames($('add-input').value);
  if (!room || !members.length) return;
  if (await groupCall('add_members', {room_id: room.id, members}, $('add-submit'))) {
    $('add-input').value = '';
  }
}

export async function renameGroup(event) {
  event.preventDefault();
  const room = currentGroup();
  const name = $('rename-input').value.trim();
  if (!room) return;
  if (!name) {
    showError('members-error', 'Give the group a name.');
    return;
  }
  await groupCall('rename_group', {room_id: room.id, name}, $('rename-submit'));
}

export async function removeMember(roomId, user, button) {
  if (!window.confirm(`Remove ${userName(user)} (@${user.username}) from the group?`)) return null;
  return groupCall('remove_member', {room_id: roomId, username: user.username}, button);
}

export async function leaveGroup() {
  const room = currentGroup();
  if (!room) return;
  // The room_left event may come before the ack: it is no news to me.
  page.ui.leaving.add(room.id);
  if (await groupCall('leave_group', {room_id: room.id}, $('leave-group'))) {
    onRoomLeft({room_id: room.id});
  } else page.ui.leaving.delete(room.id);
}

// Whom I block comes from the server (GET /api/blocks), so every device
// and a fresh browser agree; loaded on each connect, then kept in step
// with the acks of block/unblock.
export async function loadBlocked() {
  const token = page.token;
  const data = await api('GET', '/api/blocks');
  if (page.token !== token) return;  // signed out meanwhile
  page.state.blocked = new Set(data.blocks.map((b) => b.user.username));
  if (page.state.current) renderRoomHeader();
}

export async function toggleBlock() {
  const entry = page.state.rooms.get(page.state.current);
  const other = entry && entry.room.kind === 'dm' ? otherMember(page.state, entry.room) : null;
  if (!other) return;
  const on = !page.state.blocked.has(other.username);
  $('block-toggle').disabled = true;
  $('block-notice-undo').disabled = true;
  try {
    await call(on ? 'block' : 'unblock', {username: other.username});
    // The ok ack means the change is committed: no need to reload.
    if (on) page.state.blocked.add(other.username);
    else page.state.blocked.delete(other.username);
  } catch (err) {
    showNotice(`Could not ${on ? 'block' : 'unblock'} ${userName(other)}. ${friendly(err)}`);
  }
  $('block-toggle').disabled = false;
  $('block-notice-undo').disabled = false;
  if (page.state.current) renderRoomHeader();
}

// What a refused send says: in a dm, the other user has blocked us.
export function refusalText(roomId) {
  const entry = page.state.rooms.get(roomId);
  const other = entry && entry.room.kind === 'dm' ? otherMember(page.state, entry.room) : null;
  return other ? `${userName(other)} isn't accepting messages from you`
    : "you can't send messages here";
}

// Mutes or unmutes the open room (`mute_room`): a muted room sends no push
// notifications; the server keeps the choice for every device.
export async function toggleMute() {
  const entry = page.state.rooms.get(page.state.current);
  if (!entry) return;
  const muted = !entry.muted;
  $('mute-toggle').disabled = true;
  try {
    await call('mute_room', {room_id: entry.room.id, muted});
    applyMuted(page.state, entry.room.id, muted);
  } catch (err) {
    showNotice(`Could not ${muted ? 'mute' : 'unmute'} this conversation. ${friendly(err)}`);
  }
  $('mute-toggle').disabled = false;
  renderInbox();
  if (page.state.current) renderRoomHeader();
}
