/**
 * The sidebar's state: the pipelines of the active notebook, the selected pipeline's graph,
 * kept live by polling the events after the last one seen, and the selected task.
 */
import { ISignal, Signal } from '@lumino/signaling';
import { IGraph, IEvents, IPipeline, ITaskDetail, Verb, command, requestAPI } from './api';
import { ITask, applyEvents, countStates } from './graph';

/** How often the sidebar asks for new events, in milliseconds. */
export const POLL_MS = 400;
/** How often the sidebar looks for pipelines while it shows none, in milliseconds. */
export const SCAN_MS = 2000;

export class SidebarModel {
  pipelines: IPipeline[] = [];
  selected: IPipeline | null = null;
  graph: IGraph | null = null;
  tasks = new Map<string, ITask>();
  detail: ITaskDetail | null = null;
  error: string | null = null;
  path = '';
  /** Runs the "Export notebook to nbpipe script" command (set by the plugin). */
  exportCommand: (() => Promise<unknown>) | null = null;
  private _lastEvent = 0;
  private _timer: number | null = null;
  private _busy = false;
  private _lastScan = 0;
  private _changed = new Signal<this, void>(this);
  private _version = 0;

  /** Emitted whenever anything shown changed. */
  get changed(): ISignal<this, void> {
    return this._changed;
  }

  /** Bumped on every change (React re-renders on it). */
  get version(): number {
    return this._version;
  }

  private _emit(): void {
    this._version += 1;
    this._changed.emit();
  }

  /** Look for pipelines for a notebook (or, with '', everything under the server root). */
  async setPath(path: string): Promise<void> {
    this.path = path;
    await this.refreshPipelines();
  }

  async refreshPipelines(): Promise<void> {
    try {
      const found = await requestAPI<IPipeline[]>('pipelines', { path: this.path });
      // A store that cannot be read is listed with its reason: shown, never selectable.
      this.pipelines = found.filter(p => !p.error);
      const bad = found.filter(p => p.error).map(p => p.error);
      this.error = bad.length ? bad.join('\n') : null;
    } catch (e) {
      this.pipelines = [];
      this.error = (e as Error).message;
    }
    const keep =
      this.selected &&
      this.pipelines.find(p => p.store === this.selected?.store && p.name === this.selected?.name);
    const choice = keep || this.pipelines.find(p => p.default) || this.pipelines[0] || null;
    if (!choice) {
      this.selected = null;
      this.graph = null;
      this.tasks.clear();
      this._emit();
      return;
    }
    if (!keep) {
      await this.select(choice);
    } else {
      this._emit();
    }
  }

  /** Show another pipeline. */
  async select(pipeline: IPipeline): Promise<void> {
    this.selected = pipeline;
    this.detail = null;
    await this.loadGraph();
  }

  async loadGraph(): Promise<void> {
    const p = this.selected;
    if (!p) {
      return;
    }
    try {
      this.graph = await requestAPI<IGraph>('graph', { store: p.store, pipeline: p.name });
      this.tasks = new Map(this.graph.nodes.map(t => [t.key, t]));
      this._lastEvent = this.graph.last_event;
      this.error = null;
    } catch (e) {
      this.error = (e as Error).message;
    }
    this._emit();
  }

  /** Start polling for state changes. */
  start(): void {
    if (this._timer === null) {
      this._timer = window.setInterval(() => void this.poll(), POLL_MS);
    }
  }

  dispose(): void {
    if (this._timer !== null) {
      window.clearInterval(this._timer);
      this._timer = null;
    }
  }

  /** One look at the events after the last one seen; a new task reloads the graph. */
  async poll(): Promise<void> {
    const p = this.selected;
    if (this._busy) {
      return;
    }
    if (!p) {
      // No pipeline yet: look again now and then (a folder scan is not free).
      if (Date.now() - this._lastScan > SCAN_MS) {
        this._busy = true;
        this._lastScan = Date.now();
        try {
          await this.refreshPipelines();
        } finally {
          this._busy = false;
        }
      }
      return;
    }
    this._busy = true;
    try {
      const update = await requestAPI<IEvents>('events', {
        store: p.store,
        pipeline: p.name,
        since: String(this._lastEvent)
      });
      if (update.events.length === 0 && this.graph && update.paused === this.graph.paused) {
        return;
      }
      this._lastEvent = update.last_event;
      const unknown = applyEvents(this.tasks, update.events);
      if (unknown.length && this.graph) {
        await this.loadGraph();
        return;
      }
      if (this.graph) {
        this.graph = { ...this.graph, counts: countStates(this.tasks.values()), paused: update.paused };
      }
      if (this.detail && update.events.some(e => e.key === this.detail?.key)) {
        await this.showTask(this.detail.key);
      }
      this._emit();
    } catch (e) {
      this.error = (e as Error).message;
      this._emit();
    } finally {
      this._busy = false;
    }
  }

  /** Load the detail panel of a task. */
  async showTask(key: string | null): Promise<void> {
    const p = this.selected;
    if (!p || key === null) {
      this.detail = null;
      this._emit();
      return;
    }
    try {
      this.detail = await requestAPI<ITaskDetail>('task', { store: p.store, pipeline: p.name, task: key });
      this.error = null;
    } catch (e) {
      this.error = (e as Error).message;
    }
    this._emit();
  }

  /** Send a command; errors show in the sidebar. */
  async send(verb: Verb, extra: { tasks?: string[]; failed?: boolean; all?: boolean } = {}): Promise<void> {
    const p = this.selected;
    if (!p) {
      return;
    }
    try {
      await command(p.store, p.name, verb, extra);
      this.error = null;
    } catch (e) {
      this.error = (e as Error).message;
    }
    await this.poll();
    this._emit();
  }
}
