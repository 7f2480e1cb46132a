// The HTTP API (PROTOCOL.md, "HTTP API"): one function per request, with
// the signed-in token. DOM-free: runs in the page and under Node.

export class ApiError extends Error {
  constructor(message, status, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// Returns `api(method, path, body)`: resolves to the answer's JSON (null
// for an empty one), rejects with an ApiError carrying the HTTP status and
// the error code. `getToken()` is asked on every call (sign-in changes it);
// `base` is '' in the page, the server's URL elsewhere. A FormData body is
// sent as it is (uploads), anything else as JSON.
export function createApi(getToken, base = '') {
  return async function api(method, path, body) {
    const headers = {};
    const token = getToken();
    if (token) headers.Authorization = `Bearer ${token}`;
    let payload;
    if (typeof FormData !== 'undefined' && body instanceof FormData) payload = body;
    else if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
      payload = JSON.stringify(body);
    }
    const res = await fetch(base + path, {method, headers, body: payload});
    let data = null;
    try { data = await res.json(); } catch (e) { /* empty or not JSON */ }
    if (!res.ok) {
      const error = (data && data.error) || {};
      throw new ApiError(error.message || `HTTP ${res.status}`, res.status, error.code);
    }
    return data;
  };
}
