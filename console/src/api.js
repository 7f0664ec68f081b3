// The console's only way to the daemon: the HTTP API, with the signed-in token. The console
// holds no privileges of its own; what the token may not do, the API refuses.

const KEY = "scriptd.token";

export function savedToken() {
  return sessionStorage.getItem(KEY);
}

export function saveToken(token) {
  if (token) sessionStorage.setItem(KEY, token);
  else sessionStorage.removeItem(KEY);
}

/** An API error: the problem document's title and detail, and the fields it names. */
export class ApiError extends Error {
  constructor(status, problem) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.status = status;
    this.problem = problem;
  }
}

/** Calls the API; resolves to the JSON answer (null for 204), rejects with an ApiError. */
export async function api(method, path, body, token = savedToken()) {
  const headers = { Accept: "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (e) {
    throw new ApiError(0, { title: "The daemon did not answer", detail: String(e) });
  }
  if (response.status === 204) return null;
  const text = await response.text();
  let value = null;
  try {
    value = text ? JSON.parse(text) : null;
  } catch {
    value = { title: text };
  }
  if (!response.ok) throw new ApiError(response.status, value || {});
  return value;
}

/** `/v1/tenants/<tenant>` with each further part escaped. */
export function tenantPath(tenant, ...parts) {
  return ["/v1/tenants", tenant, ...parts].map((p, i) => (i ? encodeURIComponent(p) : p)).join("/");
}

/** A query string from the set members of `params`. */
export function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== null && v !== "") q.set(k, String(v));
  }
  const s = q.toString();
  return s ? `?${s}` : "";
}
