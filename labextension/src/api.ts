/**
 * The server extension's REST API (`/nbpipe/api/...`). ServerConnection adds Jupyter's
 * authentication and XSRF headers.
 */
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';
import { IEdge, IEvent, ITask, State } from './graph';

export interface IRunner {
  pid: number;
  host: string;
  started: number;
  cluster: string;
  dashboard: string | null;
}

export interface IPipeline {
  store: string;
  name: string;
  tasks: number;
  states: Partial<Record<State, number>>;
  paused: boolean;
  runner: IRunner | null;
  default: boolean;
  /** Set (and name null) for a store that cannot be read: damaged, newer, linked out. */
  error?: string;
}

export interface IGraph {
  pipeline: string;
  nodes: ITask[];
  edges: IEdge[];
  counts: Partial<Record<State, number>>;
  paused: boolean;
  runner: IRunner | null;
  last_event: number;
}

export interface IEvents {
  events: IEvent[];
  last_event: number;
  paused: boolean;
  runner: IRunner | null;
}

export interface IAttempt {
  number: number;
  state: string;
  start: number | null;
  end: number | null;
  seconds: number | null;
  worker: string | null;
  hostname: string | null;
  job_id: string | null;
  exit_code: number | null;
  error: string | null;
  traceback: string | null;
  stdout: string | null;
  stderr: string | null;
  python: string | null;
  git_commit: string | null;
  packages: Record<string, string> | null;
}

export interface ITaskDetail {
  name: string;
  key: string;
  label: string;
  state: State;
  reason: string | null;
  error: string | null;
  /** How it ended where the state does not say it all: 'timed out', 'accepted', 'adopted'. */
  outcome?: string | null;
  resources: Record<string, unknown>;
  attempts: IAttempt[];
  cell: string | null;
  /** Whether the cell's text (sent as `source`) defines other code than this task; null: not asked. */
  cell_changed: boolean | null;
}

export type Verb = 'retry' | 'kill' | 'pause' | 'resume';

/**
 * How long a read may take before it is given up (and asked again by the next poll), in ms: a
 * request lost on its way (a proxy, a server restart) must not leave the sidebar waiting for ever.
 */
export const READ_TIMEOUT_MS = 30_000;

/** GET or POST an endpoint; a failed request throws with the server's message. */
export async function requestAPI<T>(
  endpoint: string,
  params: Record<string, string> = {},
  init: RequestInit = {}
): Promise<T> {
  const settings = ServerConnection.makeSettings();
  const query = new URLSearchParams(params).toString();
  const url = URLExt.join(settings.baseUrl, 'nbpipe', 'api', endpoint) + (query ? `?${query}` : '');
  if (!init.method || init.method === 'GET') {
    init = { ...init, signal: init.signal ?? AbortSignal.timeout(READ_TIMEOUT_MS) };
  }
  const response = await ServerConnection.makeRequest(url, init, settings);
  let data: any = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  if (!response.ok) {
    throw new Error((data && data.message) || response.statusText);
  }
  return data as T;
}

/** Ask the pipeline to retry, kill, pause or resume. */
export function command(
  store: string,
  pipeline: string,
  verb: Verb,
  extra: { tasks?: string[]; failed?: boolean; all?: boolean } = {}
): Promise<unknown> {
  return requestAPI('command', {}, {
    method: 'POST',
    body: JSON.stringify({ store, pipeline, verb, ...extra })
  });
}
