// The page's one session: the store's state, the connection, the HTTP API
// and what only the views need (composer, typing timers, rendered nodes).
// Every other module of the page imports this object.
import {createApi} from './api.js';
import {createState} from './store.js';

export const page = {
  token: localStorage.getItem('postbox.token'),
  state: createState(JSON.parse(localStorage.getItem('postbox.user') || 'null')),
  conn: null,             // the Connection while signed in
  ui: null,               // see resetUi()
};

export const api = createApi(() => page.token);

export function resetUi() {
  page.ui = {
    seeded: false,          // the inbox was loaded once since sign-in
    loadingInbox: false,
    typing: new Map(),      // room id -> Map(user id -> {user, timer})
    blobs: new Map(),       // attachment url -> Promise of a blob: URL
    files: [],              // attachments being prepared in the composer
    editing: null,          // id of the message being edited
    draftBeforeEdit: '',    // the composer's text when an edit took it over
    leaving: new Set(),     // ids of groups I am leaving myself
    noticeTimer: 0,         // hides the composer's notice (see showNotice)
    replyTo: null,          // message the composer replies to
    picker: null,           // id of the message whose reaction picker is open
    typingSentAt: 0,
    nodes: new Map(),       // message key -> rendered <li> (reused while unchanged)
  };
}
resetUi();

// An ack'ed Socket.IO call on the page's connection.
export function call(event, data) {
  if (!page.conn) return Promise.reject(Object.assign(new Error('You are offline.'), {code: 'offline'}));
  return page.conn.call(event, data);
}
