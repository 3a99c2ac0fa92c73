/**
 * The sidebar's state: the pipelines of the active notebook, the selected pipeline's graph,
 * kept live by polling the events after the last one seen, and the selected task.
 *
 * Which pipeline shows: the pipeline of the notebook in focus (its kernel's pipeline, named
 * after the notebook), switching with the tab, unless the user pinned another in the picker.
 */
import { ISignal, Signal } from '@lumino/signaling';
import { IGraph, IEvents, IPipeline, IRunner, ITaskDetail, Verb, command, requestAPI } from './api';
import { ITask, applyEvents, countStates, successor } from './graph';

/** How often the sidebar asks for new events, in milliseconds. */
export const POLL_MS = 400;
/** How often the sidebar looks for pipelines while it shows none, in milliseconds. */
export const SCAN_MS = 2000;

function sameRunner(a: IRunner | null | undefined, b: IRunner | null | undefined): boolean {
  return JSON.stringify(a ?? null) === JSON.stringify(b ?? null);
}

/** Whether two listings name the same pipeline (a new listing gives new objects for it). */
function samePipeline(a: IPipeline | null, b: IPipeline | null): boolean {
  return !!a && !!b && a.store === b.store && a.name === b.name;
}

export class SidebarModel {
  pipelines: IPipeline[] = [];
  selected: IPipeline | null = null;
  /** True when the user chose the pipeline in the picker: it stays when the notebook changes. */
  pinned = false;
  graph: IGraph | null = null;
  tasks = new Map<string, ITask>();
  detail: ITaskDetail | null = null;
  error: string | null = null;
  path = '';
  /** Runs the "Export notebook to nbpipe script" command (set by the plugin). */
  exportCommand: (() => Promise<unknown>) | null = null;
  /** Opens the pipeline in a full-size tab (set by the plugin). */
  openMain: (() => void) | null = null;
  /** The current text of a notebook cell by id, or null when no open notebook has it. */
  cellSource: (cellId: string) => string | null = () => null;
  private _lastEvent = 0;
  private _timer: number | null = null;
  private _busy = false;
  private _loading: { pipeline: IPipeline; done: Promise<void> } | null = null;
  private _lastScan = 0;
  private _checkedSource: string | null = null;
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

  /** Follow a notebook (or, with '', everything under the server root): show its pipeline. */
  async setPath(path: string): Promise<void> {
    const moved = path !== this.path;
    this.path = path;
    await this.refreshPipelines(moved);
  }

  /**
   * Look for pipelines again. The choice: a pinned pipeline while it exists; else the focused
   * notebook's own pipeline (none until it has run: never another notebook's); without a
   * notebook, the current choice or the first pipeline.
   */
  async refreshPipelines(moved = false): Promise<void> {
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
    const find = (p: IPipeline | null) => p && this.pipelines.find(q => q.store === p.store && q.name === p.name);
    let choice: IPipeline | null | undefined;
    if (this.pinned && find(this.selected)) {
      choice = find(this.selected);
    } else {
      this.pinned = false;
      if (this.path.endsWith('.ipynb')) {
        choice = this.pipelines.find(p => p.default) ?? null;
      } else {
        choice = (!moved && find(this.selected)) || this.pipelines[0] || null;
      }
    }
    if (!choice) {
      if (this.selected) {
        this.selected = null;
        this.graph = null;
        this.detail = null;
        this.tasks = new Map();
      }
      this._emit();
      return;
    }
    if (!samePipeline(choice, this.selected)) {
      await this.select(choice, this.pinned);
    } else {
      // the same pipeline, listed again: a graph still loading is not started over (a big graph
      // that takes longer to load than the listings come would never show)
      this.selected = choice;
      if (!this.graph) {
        await this.loadGraph();
      } else {
        this._emit();
      }
    }
  }

  /** Show another pipeline; `pin` keeps it shown when the notebook in focus changes. */
  async select(pipeline: IPipeline, pin = false): Promise<void> {
    this.selected = pipeline;
    this.pinned = pin;
    this.detail = null;
    this.graph = null;
    this.tasks = new Map();
    await this.loadGraph();
  }

  /** Stop pinning: show the focused notebook's pipeline again. */
  async unpin(): Promise<void> {
    this.pinned = false;
    await this.refreshPipelines(true);
  }

  /** Load the selected pipeline's graph; one request at a time per pipeline (a big graph is slow). */
  loadGraph(): Promise<void> {
    const p = this.selected;
    if (!p) {
      return Promise.resolve();
    }
    if (this._loading && samePipeline(this._loading.pipeline, p)) {
      return this._loading.done;
    }
    const done = this._fetchGraph(p).finally(() => {
      if (this._loading?.done === done) {
        this._loading = null;
      }
    });
    this._loading = { pipeline: p, done };
    return done;
  }

  private async _fetchGraph(p: IPipeline): Promise<void> {
    try {
      const graph = await requestAPI<IGraph>('graph', { store: p.store, pipeline: p.name });
      if (!samePipeline(this.selected, p)) {
        return; // another pipeline was chosen meanwhile
      }
      this.graph = graph;
      this.tasks = new Map(graph.nodes.map(t => [t.key, t]));
      this._lastEvent = graph.last_event;
      this.error = null;
    } catch (e) {
      this.error = (e as Error).message;
    }
    // the open panel follows its task to its new key (a re-run cell, an edited function)
    const d = this.detail;
    if (d && !this.tasks.has(d.key)) {
      const next = successor(this.tasks, d);
      if (next) {
        await this.showTask(next.key);
        return;
      }
      this.detail = null;
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
    if (!this.graph) {
      // the graph has not come (its request failed, or another listing replaced it): ask again,
      // or the sidebar would show the pipeline's name over nothing for good
      try {
        await this.loadGraph();
      } finally {
        this._busy = false;
      }
      return;
    }
    try {
      const update = await requestAPI<IEvents>('events', {
        store: p.store,
        pipeline: p.name,
        since: String(this._lastEvent)
      });
      if (!samePipeline(this.selected, p)) {
        return;
      }
      const cellMoved = this._cellMoved();
      if (
        update.events.length === 0 &&
        this.graph &&
        update.paused === this.graph.paused &&
        sameRunner(update.runner, this.graph.runner) &&
        !cellMoved
      ) {
        return;
      }
      this._lastEvent = update.last_event;
      const unknown = applyEvents(this.tasks, update.events);
      if (unknown.length && this.graph) {
        await this.loadGraph();
        return;
      }
      if (this.graph) {
        this.graph = {
          ...this.graph,
          counts: countStates(this.tasks.values()),
          paused: update.paused,
          runner: update.runner
        };
      }
      if (this.detail && (cellMoved || update.events.some(e => e.key === this.detail?.key))) {
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

  /** Whether the open panel's cell was edited since the panel last asked about it. */
  private _cellMoved(): boolean {
    const cell = this.detail?.cell;
    return !!cell && this.cellSource(cell) !== this._checkedSource;
  }

  /** Load the detail panel of a task (null closes it). */
  async showTask(key: string | null): Promise<void> {
    const p = this.selected;
    if (!p || key === null) {
      this.detail = null;
      this._emit();
      return;
    }
    const cell = this.tasks.get(key)?.cell ?? null;
    const source = cell ? this.cellSource(cell) : null;
    const params: Record<string, string> = { store: p.store, pipeline: p.name, task: key };
    if (source !== null) {
      params.source = source;
    }
    try {
      this.detail = await requestAPI<ITaskDetail>('task', params);
      this._checkedSource = source;
      this.error = null;
    } catch (e) {
      this.error = (e as Error).message;
    }
    this._emit();
  }

  /** Hide the error message. */
  dismissError(): void {
    this.error = null;
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
