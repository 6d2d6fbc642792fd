// The Flotilla API from the browser: requests with the bearer token, errors as the API's
// Status (message and field paths), and watch streams read with fetch.

import type { components } from "./schema";

export type Schemas = components["schemas"];
export type VirtualMachine = Schemas["VirtualMachine"];
export type Node = Schemas["Node"];
export type Image = Schemas["Image"];

/** Any API object: what every list and watch carries. */
export interface ApiObject {
  apiVersion?: string;
  kind?: string;
  metadata: {
    name: string;
    namespace?: string | null;
    uid?: string;
    resourceVersion?: string;
    creationTimestamp?: string;
    deletionTimestamp?: string | null;
    labels?: Record<string, string>;
    annotations?: Record<string, string>;
  };
  spec?: any;
  status?: any;
  [key: string]: unknown;
}

export const GROUP = "/apis/flotilla.dev/v1alpha1";

const TOKEN_KEY = "flotilla.token";

export function token(): string | null {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function setToken(value: string | null) {
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
}

/** A field the server named in its answer, and what it said about it. */
export interface FieldProblem {
  field: string;
  message: string;
}

/** An answer other than 2xx: the API's Status, readable by a person. */
export class ApiError extends Error {
  code: number;
  reason: string;
  fields: FieldProblem[];

  constructor(code: number, reason: string, message: string, fields: FieldProblem[] = []) {
    super(message);
    this.code = code;
    this.reason = reason;
    this.fields = fields;
  }

  /** What the server said about `field` (or a field under it). */
  about(field: string): string | undefined {
    return this.fields.find((f) => f.field === field || f.field.startsWith(field + "."))?.message;
  }
}

/** Called when the token stops working, so the app can ask for another. */
let onUnauthorized: () => void = () => {};
export function whenUnauthorized(callback: () => void) {
  onUnauthorized = callback;
}

async function errorOf(resp: Response): Promise<ApiError> {
  const text = await resp.text();
  try {
    const status = JSON.parse(text);
    const causes: FieldProblem[] = (status?.details?.causes ?? []).map((c: any) => ({
      field: c.field ?? "",
      message: c.message ?? "",
    }));
    return new ApiError(resp.status, status.reason ?? "", status.message ?? text, causes);
  } catch {
    return new ApiError(resp.status, resp.statusText, text || resp.statusText);
  }
}

export async function request<T = any>(
  method: string,
  path: string,
  body?: unknown,
  contentType = "application/json",
): Promise<T> {
  const headers: Record<string, string> = { Accept: "application/json" };
  const t = token();
  if (t) headers.Authorization = `Bearer ${t}`;
  if (body !== undefined) headers["Content-Type"] = contentType;
  const resp = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!resp.ok) {
    const error = await errorOf(resp);
    if (resp.status === 401 && t) onUnauthorized();
    throw error;
  }
  if (resp.status === 204) return undefined as T;
  return resp.json();
}

/** The path of a collection (or of one object, with `name`). */
export function pathOf(
  plural: string,
  project: string | null,
  name?: string,
  group = GROUP,
): string {
  let p = group;
  if (project) p += `/namespaces/${encodeURIComponent(project)}`;
  p += `/${plural}`;
  if (name) p += `/${encodeURIComponent(name)}`;
  return p;
}

export interface List {
  items: ApiObject[];
  resourceVersion: string;
}

export async function list(plural: string, project: string | null, group = GROUP): Promise<List> {
  const answer = await request("GET", pathOf(plural, project, undefined, group));
  return { items: answer.items ?? [], resourceVersion: answer.metadata?.resourceVersion ?? "0" };
}

export type WatchEvent =
  | { type: "ADDED" | "MODIFIED" | "DELETED"; object: ApiObject }
  | { type: "BOOKMARK"; object: ApiObject }
  | { type: "ERROR"; object: { code?: number; message?: string } };

/**
 * Follows a collection from `resourceVersion`, calling `onEvent` for each change, until
 * `signal` aborts or the stream ends (then the promise settles: the caller lists again).
 */
export async function watch(
  plural: string,
  project: string | null,
  resourceVersion: string,
  onEvent: (e: WatchEvent) => void,
  signal: AbortSignal,
  group = GROUP,
): Promise<void> {
  const query = new URLSearchParams({
    watch: "true",
    resourceVersion,
    allowWatchBookmarks: "true",
  });
  const headers: Record<string, string> = {};
  const t = token();
  if (t) headers.Authorization = `Bearer ${t}`;
  const resp = await fetch(`${pathOf(plural, project, undefined, group)}?${query}`, {
    headers,
    signal,
  });
  if (!resp.ok || !resp.body) throw await errorOf(resp);
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffered += value;
    let newline;
    while ((newline = buffered.indexOf("\n")) >= 0) {
      const line = buffered.slice(0, newline).trim();
      buffered = buffered.slice(newline + 1);
      if (line) onEvent(JSON.parse(line));
    }
  }
}

/** Where people sign in, when the server has an OIDC issuer. */
export async function loginConfig(): Promise<{ issuer: string; clientID: string } | null> {
  const resp = await fetch("/flotilla/v1/login");
  return resp.ok ? resp.json() : null;
}

/** A single-use ticket opening a console's WebSocket (browsers cannot send the token). */
export async function consoleSocketUrl(
  project: string,
  vm: string,
  console: "console" | "vnc",
): Promise<string> {
  const answer = await request("POST", `${pathOf("virtualmachines", project, vm)}/${console}`);
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}${answer.path}`;
}
