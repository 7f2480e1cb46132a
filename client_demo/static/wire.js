// The page's event listeners: what each control and key does.
import {addMembers, createGroup, leaveGroup, renameGroup, startDm, toggleBlock, toggleMute} from './actions.js';
import {closeRoom, loadMoreInbox, loadOlder, logout, markRead, onStorage, openRoom,
  signOutEverywhere} from './app.js';
import {setAuthMode, submitAuth} from './signin.js';
import {addFiles, cancelEdit, cancelReply, editLastOwn, hideNotice, stopTyping, submitComposer,
  typed} from './composer.js';
import {page} from './page.js';
import {togglePush} from './push.js';
import {$} from './util.js';
import {closePicker, scrollToMessage} from './views/messages.js';
import {toggleMembers} from './views/room.js';

export function wire() {
  $('tab-login').addEventListener('click', () => setAuthMode('login'));
  $('tab-register').addEventListener('click', () => setAuthMode('register'));
  $('auth-form').addEventListener('submit', submitAuth);
  $('logout').addEventListener('click', logout);
  $('notify-toggle').addEventListener('click', togglePush);
  $('mute-toggle').addEventListener('click', toggleMute);
  $('inbox-more').addEventListener('click', loadMoreInbox);
  $('inbox').addEventListener('scroll', () => {
    const list = $('inbox');
    if (list.scrollHeight - list.scrollTop - list.clientHeight < 80) loadMoreInbox();
  });
  $('logout-all').addEventListener('click', signOutEverywhere);
  $('block-toggle').addEventListener('click', toggleBlock);
  $('block-notice-undo').addEventListener('click', toggleBlock);
  $('members-toggle').addEventListener('click', () => toggleMembers());
  $('members-close').addEventListener('click', () => toggleMembers(false));
  $('add-form').addEventListener('submit', addMembers);
  $('rename-form').addEventListener('submit', renameGroup);
  $('leave-group').addEventListener('click', leaveGroup);
  $('reply-cancel').addEventListener('click', () => {
    cancelReply();
    $('composer-input').focus();
  });
  $('new-dm').addEventListener('submit', startDm);
  $('new-group-toggle').addEventListener('click', () => {
    $('new-group').hidden = !$('new-group').hidden;
    if (!$('new-group').hidden) $('new-group-name').focus();
  });
  $('new-group').addEventListener('submit', createGroup);
  $('composer').addEventListener('submit', submitComposer);
  const input = $('composer-input');
  input.addEventListener('input', typed);
  input.addEventListener('blur', stopTyping);
  input.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $('composer').requestSubmit();
    } else if (event.key === 'Escape') {
      if (page.ui.editing) cancelEdit();
      else cancelReply();
    } else if (event.key === 'ArrowUp' && !input.value && !page.ui.editing) {
      if (editLastOwn()) event.preventDefault();
    }
  });
  input.addEventListener('paste', (event) => {
    const files = event.clipboardData && event.clipboardData.files;
    if (files && files.length) {
      event.preventDefault();
      addFiles(files);
    }
  });
  $('edit-cancel').addEventListener('click', () => {
    cancelEdit();
    input.focus();
  });
  $('notice-close').addEventListener('click', hideNotice);
  $('back').addEventListener('click', closeRoom);
  document.addEventListener('keydown', (event) => {
    const overlay = document.querySelector('.lightbox');
    if (event.key !== 'Escape') return;
    if (overlay) overlay.remove();
    else if (page.ui.picker !== null) closePicker();
    else if (!event.target.closest('#composer')) toggleMembers(false);
  });
  document.addEventListener('click', (event) => {
    if (page.ui.picker !== null && !event.target.closest('.picker, .react-open')) closePicker();
  });
  $('file-input').addEventListener('change', (event) => {
    addFiles(event.target.files);
    event.target.value = '';
  });
  const room = $('room');
  room.addEventListener('dragover', (event) => event.preventDefault());
  room.addEventListener('drop', (event) => {
    event.preventDefault();
    if (event.dataTransfer && event.dataTransfer.files.length) addFiles(event.dataTransfer.files);
  });
  $('messages').addEventListener('scroll', () => {
    if ($('messages').scrollTop < 120) loadOlder();
  });
  document.addEventListener('visibilitychange', markRead);
  // Another tab signed out (or in as someone else).
  window.addEventListener('storage', onStorage);
  window.addEventListener('focus', markRead);
  // static/search.js asks for a message: open its room, page back to it.
  window.addEventListener('postbox:show-message', async ({detail}) => {
    await openRoom(detail.room_id);
    const c = page.state.convos.get(detail.room_id);
    while (c && !c.messages.has(detail.id) && c.hasMore && page.state.current === detail.room_id) {
      if (c.loadingOlder) { await new Promise((r) => setTimeout(r, 50)); continue; }
      const size = c.messages.size;
      await loadOlder();
      if (c.messages.size === size) break;
    }
    scrollToMessage(detail.id);
  });
}
