// Postbox's service worker: shows a Web Push message as a notification
// while the page is closed (static/push.js subscribes). The payload is the
// server's JSON {type: "message", room_id, seq, message_id, sender, body?,
// unread}; body is absent when the server keeps bodies out of pushes. One
// notification per room (its tag): a newer message replaces the older one.
'use strict';

function senderName(sender) {
  return (sender && (sender.display_name || sender.username)) || 'Postbox';
}

self.addEventListener('push', (event) => {
  let data = {};
  try {
    data = event.data ? event.data.json() : {};
  } catch (err) {
    data = {};
  }
  const unread = data.unread > 1 ? ` (${data.unread} unread)` : '';
  const body = (typeof data.body === 'string' && data.body ? data.body : 'New message') + unread;
  event.waitUntil(self.registration.showNotification(senderName(data.sender), {
    body,
    tag: `room-${data.room_id}`,
    renotify: true,
    data: {room_id: data.room_id},
  }));
});

// A click opens the conversation: in an open Postbox tab if there is one.
self.addEventListener('notificationclick', (event) => {
  event.notification.close();
  const roomId = event.notification.data && event.notification.data.room_id;
  const url = roomId ? `/#room=${roomId}` : '/';
  event.waitUntil((async () => {
    const tabs = await self.clients.matchAll({type: 'window', includeUncontrolled: true});
    const tab = tabs.find((c) => new URL(c.url).pathname === '/');
    if (!tab) return self.clients.openWindow(url);
    tab.postMessage({type: 'open_room', room_id: roomId});
    return tab.focus();
  })());
});
