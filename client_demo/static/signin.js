// The sign-in form of the demo page: signing in or creating an account,
// then handing the session to app.js.
import {signedIn} from './app.js';
import {api} from './page.js';
import {$, showError} from './util.js';

let authMode = 'login';

export function setAuthMode(mode) {
  authMode = mode;
  $('tab-login').classList.toggle('active', mode === 'login');
  $('tab-register').classList.toggle('active', mode === 'register');
  $('display-name-field').hidden = mode !== 'register';
  $('auth-submit').textContent = mode === 'login' ? 'Sign in' : 'Create account';
  $('auth-password').autocomplete = mode === 'login' ? 'current-password' : 'new-password';
  showError('auth-error', '');
}

export async function submitAuth(event) {
  event.preventDefault();
  const body = {
    username: $('auth-username').value.trim().toLowerCase(),
    password: $('auth-password').value,
  };
  const display = $('auth-display-name').value.trim();
  if (authMode === 'register' && display) body.display_name = display;
  $('auth-submit').disabled = true;
  try {
    const data = await api('POST', authMode === 'login' ? '/api/login' : '/api/register', body);
    signedIn(data.token, data.user);
  } catch (err) {
    showError('auth-error', err.status === 401 ? 'Wrong username or password.'
      : err.status === 409 ? 'That username is taken.' : err.message);
  } finally {
    $('auth-submit').disabled = false;
  }
}
